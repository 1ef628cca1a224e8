"""Property-based fuzzing of the whole HTTP API from its OpenAPI schema: no input gives a 5xx."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.stack import Stack

pytestmark = pytest.mark.slow  # starts real processes


EXAMPLES_PER_OPERATION = 30


def test_no_request_built_from_the_schema_gets_a_server_error() -> None:
    """Every operation in /openapi.json, fed schema-based and mutated inputs, answers below 500."""
    s = Stack(apis=1, workers=1, env={
        "TOKENRELAY_FAKE_TPS": "100000",  # generations the fuzzer creates end at once
        "TOKENRELAY_MAX_TOKENS_LIMIT": "64",
        "TOKENRELAY_HEARTBEAT_S": "1",
    })
    try:
        schema = schemathesis.openapi.from_url(f"{s.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 6, "the schema lists the API's operations"
        failures: list[str] = []
        seen: list[int] = []
        for operation in operations:
            strategy = operation.as_strategy()

            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy, data=st.data())
            def check(case: schemathesis.Case, data: st.DataObject) -> None:
                try:
                    response = case.call(base_url=s.url, timeout=20)
                except Exception as exc:  # a transport failure is a server failure too
                    failures.append(f"{case.method} {case.formatted_path}: {exc!r}")
                    return
                seen.append(response.status_code)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} -> "
                                    f"{response.status_code}: {response.text[:200]}")

            check()
        assert not failures, "\n".join(failures[:20])
        assert len(seen) >= 3 * len(operations), "the fuzzer really called the API"
        assert httpx.get(f"{s.url}/readyz").status_code == 200
    finally:
        s.stop()
