"""The load harness against a real server on 127.0.0.1 (tiny random Llama), and its pure parts."""

from __future__ import annotations

import argparse
import json
import math
import os

import pytest

from load_tests.client import RequestRecord
from load_tests.harness import SLO, add_loadtest_args, parse_slo, percentiles, run_from_args, server_side_means_ms
from load_tests.workload import arrival_offsets_s, file_workload, random_text_workload, random_token_workload


def test_random_workload_is_reproducible_and_shares_the_prefix():
    a = random_token_workload(5, input_len=12, output_len=3, shared_prefix_len=4, token_range=(10, 20), seed=1)
    b = random_token_workload(5, input_len=12, output_len=3, shared_prefix_len=4, token_range=(10, 20), seed=1)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert all(len(s.prompt) == 12 and s.ignore_eos and s.max_tokens == 3 for s in a)
    assert len({tuple(s.prompt[:4]) for s in a}) == 1 and len({tuple(s.prompt) for s in a}) == 5


def test_prompt_lengths_vary_past_a_shared_prefix():
    specs = random_token_workload(40, input_len=1, output_len=3, shared_prefix_len=16, token_range=(10, 99), seed=2,
                                  unique_len_range=(32, 64))
    lengths = [len(s.prompt) for s in specs]
    assert min(lengths) >= 48 and max(lengths) <= 80 and len(set(lengths)) > 10
    assert [s.prompt_len for s in specs] == lengths and len({tuple(s.prompt[:16]) for s in specs}) == 1
    chat = random_text_workload(10, input_len=1, output_len=3, shared_prefix_len=4, seed=2, unique_len_range=(1, 9))
    assert len({len(s.messages[0]["content"].split()) for s in chat}) > 3
    with pytest.raises(ValueError):
        random_token_workload(2, 8, 3, 0, (10, 20), 0, unique_len_range=(5, 2))


def test_arrivals_have_the_requested_mean_rate():
    offsets = arrival_offsets_s(4000, request_rate=50.0, burstiness=1.0, seed=0)
    assert offsets == sorted(offsets) and offsets[0] == 0.0
    assert 0.9 / 50 < offsets[-1] / 3999 < 1.1 / 50
    assert arrival_offsets_s(3, math.inf, 1.0, 0) == [0.0, 0.0, 0.0]


def test_percentiles_slo_and_server_metric_deltas():
    p = percentiles([float(i) for i in range(1, 101)])
    assert (p["median"], p["p90"], p["p99"], p["count"]) == (50.5, 90.0, 99.0, 100)
    assert parse_slo("ttft=500,tpot=50") == SLO(ttft_s=0.5, tpot_s=0.05)
    rec = RequestRecord(0, send_s=0.0, status=200, first_token_s=0.4, end_s=1.0, output_tokens=11)
    assert rec.tpot_s == pytest.approx(0.06)
    assert SLO(ttft_s=0.5).met_by(rec) and not SLO(tpot_s=0.05).met_by(rec)
    before = "roseinfer_time_to_first_token_seconds_sum 1.0\nroseinfer_time_to_first_token_seconds_count 2.0\n"
    after = "roseinfer_time_to_first_token_seconds_sum 3.0\nroseinfer_time_to_first_token_seconds_count 6.0\n"
    assert server_side_means_ms(before, after) == {"ttft_mean_ms": pytest.approx(500.0)}


def test_file_workload_reads_prompts_and_messages(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "hi there", "max_tokens": 5}\n\n{"messages": [{"role": "user", "content": "yo"}]}\n')
    specs = file_workload(str(path), None, output_len=7, endpoint="chat")
    assert [s.max_tokens for s in specs] == [5, 7]
    assert specs[1].messages == [{"role": "user", "content": "yo"}]


def _args(base_url: str, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_loadtest_args(p)
    return p.parse_args(["--base-url", base_url, "--model", "tiny", "--no-progress", *extra])


def test_sweep_against_a_real_server_writes_results_and_plots(server, tmp_path):
    out = tmp_path / "run"
    report = run_from_args(_args(server.base_url, "--input-len", "12", "--output-len", "6", "--num-prompts", "10",
                                 "--sweep-rates", "50,inf", "--scrape-metrics", "--slo", "ttft=60000,tpot=60000",
                                 "--out", str(out)))
    assert [r["request_rate"] for r in report["runs"]] == [50.0, "inf"]
    for run in report["runs"]:
        s = run["summary"]
        assert s["completed"] == 10 and s["failed"] == 0 and s["errors_by_status"] == {}
        assert s["output_tokens"] == 60 and s["prompt_tokens"] == 120  # ignore_eos: exact lengths
        assert s["goodput_request_throughput"] == pytest.approx(s["request_throughput"])
        assert s["ttft_ms"]["count"] == 10 and s["ttft_ms"]["p99"] >= s["ttft_ms"]["median"] > 0
        assert s["server_side"]["ttft_mean_ms"] > 0
        for r in run["requests"]:
            assert r["output_tokens"] == 6 and r["chunk_times_s"] and r["finish_reason"] == "length"
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"][1]["summary"]["completed"] == 10
    for name in ("latency_cdf.png", "timeline.png", "latency_over_time.png", "server_timing.png", "sweep.png"):
        assert (out / name).stat().st_size > 1000
    # Where the time went, per request and per percentile, from the server's own clock.
    for run in report["runs"]:
        timing = run["summary"]["server_timing_ms"]
        assert timing["e2e"]["count"] == 10 and timing["decode"]["median"] > 0
        for r in run["requests"]:
            t = r["server_timing_ms"]
            assert abs(t["queue"] + t["prefill"] + t["decode"] - t["e2e"]) < 1.0 and t["ttft"] <= t["e2e"]
    # The report: one HTML file holding every plot and the tables, nothing to fetch.
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 5 and "http://" not in page.replace(server.base_url, "")
    assert "rate 50.0" in page and "rate inf" in page and "queue p50" in page and "TTFT p99" in page
    assert server.base_url in page and "random 12 in / 6 out, 10 prompts" in page


def test_compare_overlays_runs(server, tmp_path):
    from load_tests.compare import main as compare_main

    dirs = []
    for name, rates in (("before", "inf"), ("after", "20,inf")):
        out = tmp_path / name
        run_from_args(_args(server.base_url, "--input-len", "8", "--output-len", "4", "--num-prompts", "4",
                            "--sweep-rates", rates, "--out", str(out)))
        dirs.append(str(out))
    assert compare_main([*dirs, "--out", str(tmp_path / "cmp")]) == 0
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2  # CDFs of both, the sweep of the one that swept
    assert "before rate inf" in page and "after rate 20.0" in page


def test_timeline_windows_are_sized_to_the_run():
    from load_tests.plots import tokens_per_s_timeline, window_s

    assert window_s(1.0) == 0.05 and window_s(40.0) == 1.0
    ok = [{"send_s": 0.0, "end_s": 2.0, "output_tokens": 100, "chunk_times_s": [i * 0.02 for i in range(1, 101)]}]
    centers, rate, in_flight = tokens_per_s_timeline(ok, 2.0)
    assert len(centers) == 40 and in_flight[0] == 1 and in_flight[-1] == 1
    assert sum(r * window_s(2.0) for r in rate) == pytest.approx(100)  # every token in some window
    assert max(rate) <= 2 * min(r for r in rate if r)  # a steady stream reads as a steady rate


def test_chat_endpoint_and_errors_are_counted(server):
    report = run_from_args(_args(server.base_url, "--endpoint", "chat", "--input-len", "8", "--output-len", "4",
                                 "--num-prompts", "4", "--max-concurrency", "2"))
    assert report["runs"][0]["summary"]["completed"] == 4
    bad = run_from_args(_args(server.base_url, "--input-len", "300", "--output-len", "4", "--num-prompts", "3"))
    s = bad["runs"][0]["summary"]
    assert s["completed"] == 0 and s["errors_by_status"] == {"400": 3}  # over the 256-token context


def test_extra_body_goes_into_every_request(server):
    """--extra-body's fields reach the server: a choice ends each request after a word although the
    random workload asks for ignore_eos (free requests make all 8 tokens), and a broken regex is a 400."""
    held = run_from_args(_args(server.base_url, "--input-len", "8", "--output-len", "8", "--num-prompts", "3",
                               "--extra-body", '{"guided_choice": ["yes", "no"]}'))
    s = held["runs"][0]["summary"]
    assert s["completed"] == 3 and all(r["output_tokens"] < 8 for r in held["runs"][0]["requests"])
    bad = run_from_args(_args(server.base_url, "--input-len", "8", "--output-len", "8", "--num-prompts", "2",
                              "--extra-body", '{"guided_regex": "(unclosed"}'))
    assert bad["runs"][0]["summary"]["errors_by_status"] == {"400": 2}
    with pytest.raises(SystemExit):
        run_from_args(_args(server.base_url, "--extra-body", "[1]"))


def test_python_m_load_tests_runs(server, tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "load_tests", "--base-url", server.base_url, "--model", "tiny",
                          "--input-len", "8", "--output-len", "3", "--num-prompts", "3", "--no-progress"],
                         capture_output=True, text=True, timeout=300, env={**os.environ})
    assert res.returncode == 0, res.stderr
    assert "Requests completed / failed:            3 / 0" in res.stdout


def test_file_dataset_runs_and_args_can_be_reused(server, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Hello there", "max_tokens": 3}\n{"prompt": "The sky is", "max_tokens": 2}\n')
    args = _args(server.base_url, "--dataset", "file", str(path))
    for _ in range(2):  # the namespace is not consumed by a run
        s = run_from_args(args)["runs"][0]["summary"]
        assert s["completed"] == 2 and s["output_tokens"] <= 5
    with pytest.raises(SystemExit):
        run_from_args(_args(server.base_url, "--dataset", "file"))


def test_client_processes_share_one_clock(server):
    """Requests dealt to two client processes come back whole, in order, timed from one start: the
    Poisson schedule (rate 40/s, so about 0.3 s of arrivals) is kept across the processes."""
    report = run_from_args(_args(server.base_url, "--input-len", "8", "--output-len", "4", "--num-prompts", "12",
                                 "--request-rate", "40", "--client-processes", "2"))
    s, records = report["runs"][0]["summary"], report["runs"][0]["requests"]
    assert s["completed"] == 12 and s["output_tokens"] == 48
    assert [r["index"] for r in records] == list(range(12))
    sends = [r["send_s"] for r in records]
    assert all(0 <= t < s["duration_s"] for t in sends)
    # No request leaves before its place in the one schedule (a shard with its own offsets would).
    schedule = arrival_offsets_s(12, 40.0, 1.0, 0)
    assert all(sent >= planned - 1e-3 for sent, planned in zip(sends, schedule)) and schedule[-1] > 0.1
    # Both processes' requests interleave in time, as one schedule: even and odd indices overlap.
    assert min(sends[1::2]) < max(sends[0::2]) and min(sends[0::2]) < max(sends[1::2])
    assert all(r["end_s"] <= s["duration_s"] + 1e-6 for r in records)
    # The run lasts until the last stream ends, not until the client processes have exited.
    assert s["duration_s"] - max(r["end_s"] for r in records) < 0.005
