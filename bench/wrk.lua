-- wrk script of bench/table.py: POST / bodies spread over 64 sessions (when
-- wrk's method is POST), X-API-Key, and one parseable result line.
local counter = 0
wrk.method = os.getenv("BENCH_METHOD") or "GET"
wrk.headers["X-API-Key"] = os.getenv("BENCH_KEY") or "bench"
wrk.headers["Content-Type"] = "application/json"

request = function()
  if wrk.method ~= "POST" then
    return wrk.format()
  end
  counter = counter + 1
  return wrk.format(nil, nil, nil, string.format(
    '{"session":"w%d","content":"message %d from wrk"}', counter % 64, counter))
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d\n",
    summary.requests, summary.duration, e.status,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
