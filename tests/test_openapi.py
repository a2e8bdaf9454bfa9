"""
docs/openapi.yaml against a live C{twistd chatweb}: schemathesis generates
requests from the description (valid ones and invalid ones), sends them to
the real server on 127.0.0.1, and checks every answer: no 5xx, a status the
description lists for that operation, its content type, its headers and its
JSON body's schema.

The run is bounded and deterministic (hypothesis derandomized, no example
database): a few hundred requests.  schemathesis is synchronous (requests),
so it runs on a thread while the reactor keeps reading the child's output.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatweb.testing import ChatWebProcess

SPEC = Path(__file__).parent.parent / "docs" / "openapi.yaml"
KEY = "openapi-test-key"
#: Operations left out of the schemathesis run: Server-Sent Event streams
#: never end by themselves, and schemathesis reads a whole answer before it
#: checks it (tests/test_live.py tests them).
STREAMING = {"GET /events", "GET /sessions/{id}/events"}
#: Generated requests per operation and generation mode (valid, invalid).
EXAMPLES = 25


def _checks() -> list[Callable[..., Any]]:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    return [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]


def _opensWithToken(operation: Any) -> bool:
    """
    Whether a share token (a query parameter C{token}) opens C{operation}.
    """
    requirements = operation.definition.raw.get("security", [])
    return any("apiKey" not in requirement for requirement in requirements)


def _nothingToBreak(operation: Any) -> bool:
    """
    Whether C{operation} takes no input at all (GET /healthz).
    """
    raw = operation.definition.raw
    return (
        not raw.get("parameters")
        and "requestBody" not in raw
        and raw.get("security") == []
    )


def runSchemathesis(
    spec: Path, baseURL: str, key: str, examples: int = EXAMPLES
) -> tuple[int, dict[str, str]]:
    """
    Run schemathesis with C{spec} against the chatweb at C{baseURL} (blocking:
    call it on a thread).

    @return: the number of requests sent, and for each operation and
        generation mode that failed, the first failure schemathesis reported
        (with the request that shows it).
    """
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    assert baseURL.startswith("http://127.0.0.1:"), baseURL
    schema = schemathesis.openapi.from_path(str(spec))
    http = requests.Session()
    # Never through a proxy from the environment: the requests go to
    # 127.0.0.1 only.
    http.trust_env = False
    checks = _checks()
    failures: dict[str, str] = {}
    sent = 0
    # Valid and invalid requests with the key, and a few valid ones
    # without it (a wrong key is never sent: it would get 127.0.0.1
    # throttled, and every later answer would be a 429).
    runs = [
        (GenerationMode.POSITIVE, {"X-API-Key": key}, examples),
        (GenerationMode.NEGATIVE, {"X-API-Key": key}, examples),
        (GenerationMode.POSITIVE, {}, max(1, examples // 5)),
    ]
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.label in STREAMING:
            continue
        for mode, headers, count in runs:
            if mode == GenerationMode.NEGATIVE and _nothingToBreak(operation):
                # No parameter, body or key: no invalid request exists
                # (hypothesis fails the run as "unable to satisfy").
                continue
            if not headers and _opensWithToken(operation):
                # schemathesis would send made-up share tokens, which count
                # as wrong keys.
                continue

            @settings(
                max_examples=count,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: Any) -> None:
                nonlocal sent
                sent += 1
                if not headers and case.headers:
                    # schemathesis makes up a key for the security scheme:
                    # without a key means without the header.
                    for name in [n for n in case.headers if n.lower() == "x-api-key"]:
                        del case.headers[name]
                case.call_and_validate(
                    base_url=baseURL,
                    session=http,
                    headers=headers,
                    checks=checks,
                    timeout=30,
                )

            try:
                check()
            except BaseException as e:  # schemathesis raises exception groups
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                keyed = "with the key" if headers else "without a key"
                failures[f"{operation.label} ({mode.value}, {keyed})"] = str(e)
    http.close()
    return sent, failures


def throttledAnswers(spec: Path, baseURL: str, key: str) -> dict[str, str]:
    """
    Get 127.0.0.1 throttled for wrong keys, then send one request with a
    body and one without (blocking: call it on a thread).

    @return: for each request whose answer does not match C{spec}, what
        schemathesis says about it.
    """
    import requests
    import schemathesis

    assert baseURL.startswith("http://127.0.0.1:"), baseURL
    schema = schemathesis.openapi.from_path(str(spec))
    http = requests.Session()
    http.trust_env = False
    for _ in range(25):
        http.get(baseURL + "/sessions", headers={"X-API-Key": "wrong"}).close()
    failures: dict[str, str] = {}
    cases = {
        "GET /sessions": schema["/sessions"]["GET"].Case(),
        "POST / (with a body)": schema["/"]["POST"].Case(
            body={"session": "ci", "content": "hello"}, media_type="application/json"
        ),
    }
    for name, case in cases.items():
        response = case.call(base_url=baseURL, session=http, headers={"X-API-Key": key})
        if response.status_code != 429:
            failures[name] = f"not throttled: {response.status_code}"
            continue
        try:
            case.validate_response(response, checks=_checks())
        except BaseException as e:
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            failures[name] = str(e)
    http.close()
    return failures


class SpecTests(SynchronousTestCase):
    """
    docs/openapi.yaml itself.
    """

    def test_validOpenAPI31(self) -> None:
        """
        The description is valid OpenAPI 3.1 (tools that read it, such as
        code generators, accept it) and describes every route.
        """
        import schemathesis

        schema = schemathesis.openapi.from_path(str(SPEC))
        schema.validate()
        self.assertEqual(schema.raw_schema["openapi"], "3.1.0")
        self.assertEqual(
            sorted(operation.ok().label for operation in schema.get_all_operations()),
            sorted(
                [
                    "POST /",
                    "POST /sessions/{id}/messages",
                    "GET /sessions",
                    "GET /session",
                    "GET /session/raw",
                    "POST /session/share",
                    "POST /sessions/share",
                    "GET /queue",
                    "POST /queue/{id}/retry",
                    "DELETE /queue/{id}",
                    # the session API
                    "GET /queue/{id}",
                    "GET /sessions/{id}",
                    "GET /sessions/{id}/raw",
                    "GET /messages",
                    "GET /providers",
                    "POST /session/new",
                    "DELETE /session/{id}",
                    "POST /session/{id}/stop",
                    "POST /session/{id}/clear",
                    "POST /session/{id}/retry",
                    "DELETE /session/{id}/messages/{index}",
                    "PUT /session/{id}/title",
                    "PUT /session/{id}/pin",
                    "PUT /session/{id}/provider",
                    "PUT /session/{id}/model",
                    "PUT /session/{id}/cwd",
                    # live events, health, metrics
                    "GET /events",
                    "GET /sessions/{id}/events",
                    "GET /healthz",
                    "GET /metrics",
                ]
            ),
        )


class OpenAPITests(TestCase):
    """
    docs/openapi.yaml describes what a live chatweb answers.
    """

    timeout = 600

    async def startChatWeb(self) -> str:
        process = ChatWebProcess(
            os.path.abspath(self.mktemp()), KEY, testCase=self
        )
        url = await process.start()
        return url

    async def seed(self, url: str) -> None:
        """
        Give the generated requests something to find: sessions with queued
        messages (no responder delivers them).
        """
        from treq.client import HTTPClient
        from twisted.internet import reactor
        from twisted.web.client import Agent, HTTPConnectionPool

        client = HTTPClient(
            Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        )
        for session in ("ci", "0", "a/b"):
            response = await client.post(
                url + "/",
                json={"session": session, "content": "hello"},
                headers={"X-API-Key": KEY},
            )
            self.assertEqual(response.code, 204)
            await response.content()

    async def test_liveServerMatchesTheDescription(self) -> None:
        """
        Every answer chatweb gives to requests generated from
        docs/openapi.yaml is one the description lists: no 5xx, documented
        status, content type, headers and body.
        """
        url = await self.startChatWeb()
        await self.seed(url)
        sent, failures = await deferToThread(runSchemathesis, SPEC, url, KEY)
        # Every operation, valid and invalid requests (hypothesis may stop
        # early on one with few distinct inputs).
        self.assertGreater(sent, 200)
        if failures:
            self.fail(
                "\n\n".join(f"== {name}\n{text}" for name, text in failures.items())
            )

    async def test_throttledAnswersMatchTheDescription(self) -> None:
        """
        A client address throttled for wrong keys gets 429 with Retry-After
        (as docs/api.md and the description say) for every request, also
        for one with a body, which is refused before its body is read.
        """
        url = await self.startChatWeb()
        failures = await deferToThread(throttledAnswers, SPEC, url, KEY)
        if failures:
            self.fail(
                "\n\n".join(f"== {name}\n{text}" for name, text in failures.items())
            )
