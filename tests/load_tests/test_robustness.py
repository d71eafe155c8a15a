"""The robustness suite's CPU part: each check against a real server, each ending recovered."""

from __future__ import annotations

import pytest

from load_tests.robustness import (assert_recovered, check_bad_inputs, check_disconnects, check_fuzz, check_overload,
                                   check_soak)
from tests.server.conftest import SERVE_MODES, ServerProcess


def test_bad_inputs_all_get_openai_4xx(server):
    results = check_bad_inputs(server.base_url, "tiny", max_model_len=256)
    assert results["unknown model"] == 404 and results["invalid utf-8"] == 400 and len(results) > 30


def test_fuzzed_bodies_never_get_a_5xx(server):
    seen = check_fuzz(server.base_url, "tiny", max_examples=60)["status_counts"]
    assert seen.get(200, 0) > 0 and seen.get(400, 0) > 0, seen  # both valid and invalid bodies were tried


def test_dropped_streams_leak_nothing_and_survivors_finish(server):
    report = check_disconnects(server.base_url, "tiny", num_streams=120, max_tokens=24, num_survivors=4, concurrency=16)
    assert report.survivors_ok == 4


@pytest.mark.parametrize("mode", ["engine-process", "two-api-processes"])
def test_overload_rejects_the_excess_and_recovers(tiny_llama_dir, mode):
    """With two API processes each counts its own queue and the other's as of the engine's last
    report, so the excess is still turned away."""
    srv = ServerProcess(tiny_llama_dir, "--max-waiting", "2", "--max-num-seqs", "2", *SERVE_MODES[mode])
    try:
        result = check_overload(srv.base_url, "tiny", admitted=4, factor=10, max_tokens=16)
        assert result["rejected"] > 0 and result["ok"] >= 2 and result["ok"] + result["rejected"] == 40
        assert_recovered(srv.base_url)
    finally:
        assert srv.stop() == 0


def test_short_soak_keeps_memory_and_kv_flat(server):
    report = check_soak(server.base_url, "tiny", duration_s=6.0, concurrency=4, max_tokens=16, sample_every_s=0.5)
    assert report["requests"] > 0 and report["rss_mb_last"] is not None
