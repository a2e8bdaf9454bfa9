"""
Run every benchmark in bench/ (`make bench`).  Each prints its own figures,
as ratios against a baseline measured in the same run.
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = [
    "post_throughput.py",
    "render.py",
    "reactor_latency.py",
    "hostile.py",
    "crash.py",
    "queued_rss.py",
]

for name in BENCHMARKS:
    print(f"== {name}", flush=True)
    subprocess.run([sys.executable, os.path.join(HERE, name)], check=True)
