"""Fuzz every operation of the server's own OpenAPI document with schemathesis: valid-by-schema and
invalid-by-schema bodies alike must never produce a 5xx, and every error must be OpenAI-shaped."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_fixtures import MODEL, running_server

schemathesis = pytest.importorskip("schemathesis")

# Bounded so the file runs in well under a minute; SPECACHE_FUZZ_EXAMPLES=500 for a deeper run.
_N = int(os.environ.get("SPECACHE_FUZZ_EXAMPLES", "25"))
EXAMPLES = {schemathesis.GenerationMode.POSITIVE: _N, schemathesis.GenerationMode.NEGATIVE: _N}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    # Small context: whatever max_tokens the fuzzer picks, a request costs at most 64 tokens.
    with running_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("fuzz"),
        "--max-model-len",
        "64",
        "--no-cache-semantic",
        "--enable-prefix-caching",
    ) as srv:
        yield srv


def _operations(server) -> list:
    schema = schemathesis.openapi.from_url(server.base + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def _check(server, case) -> None:
    from schemathesis.checks import not_a_server_error

    response = case.call(base_url=server.base, timeout=60)
    case.validate_response(response, checks=[not_a_server_error])
    if response.status_code >= 400:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], response.text


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda m: m.value)
def test_fuzz_openapi_operations_never_5xx(server, mode):
    ops = _operations(server)
    assert {op.path for op in ops} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    for op in ops:
        if mode == schemathesis.GenerationMode.NEGATIVE and op.method.upper() == "GET":
            continue  # no parameters: nothing can be made invalid

        # Half the generated bodies name the served model, so the generation path is fuzzed too
        # (a random model name stops at the 404).
        @given(case=op.as_strategy(generation_mode=mode), served=st.booleans())
        @settings(
            max_examples=EXAMPLES[mode], deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def run(case, served):
            if served and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL
            _check(server, case)

        run()
    snap = server.wait_idle()
    assert snap["engine_requests"] == 0 and snap["kv_block_refs_held_by_requests"] == 0, snap
