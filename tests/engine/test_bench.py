"""`roseinfer bench` with real-traffic workloads: varied prompt lengths, a shared prefix, a JSONL
dataset, and HF on the same prompts in left-padded batches (CPU, tiny model)."""

from __future__ import annotations

import argparse
import json

from engine.bench import add_bench_parser, bench_prompts
from engine.tokenizer import gpt2_tokenizer


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_parser(p.add_subparsers())
    return p.parse_args(["bench", *argv])


def test_prompts_vary_share_a_prefix_or_come_from_a_file(tmp_path):
    tok = gpt2_tokenizer()
    prompts = bench_prompts(parse("--input-len-range", "5:40", "--shared-prefix-len", "16", "--num-requests", "30"),
                            tok, 50257)
    assert len(prompts) == 30 and {len(p) for p in prompts} <= set(range(21, 57)) and len({len(p) for p in prompts}) > 5
    assert len({tuple(p[:16]) for p in prompts}) == 1 and len({tuple(p[16:]) for p in prompts}) == 30
    fixed = bench_prompts(parse("--input-len", "12", "--shared-prefix-len", "4", "--num-requests", "3"), tok, 50257)
    assert [len(p) for p in fixed] == [12, 12, 12]
    assert bench_prompts(parse("--prompt", "Hello"), tok, 50257) is None
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Hello world"}) + "\n" + json.dumps({"prompt": "The sky"}) + "\n")
    rows = bench_prompts(parse("--dataset", str(data), "--num-requests", "5"), tok, 50257)
    assert rows == [tok.encode("Hello world"), tok.encode("The sky")] * 2 + [tok.encode("Hello world")]


def test_bench_runs_varied_prompts_against_hf_in_padded_batches(tiny_llama_dir, tmp_path):
    from server.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--model", tiny_llama_dir, "--input-len-range", "3:30", "--shared-prefix-len", "8",
                 "--num-requests", "6", "--max-new-tokens", "5", "--max-batch-size", "4", "--no-stop-on-eos",
                 "--warmup-runs", "0", "--repeat-runs", "1", "--compare-hf", "--hf-variants", "dynamic",
                 "--kv-cache-memory", "0.01", "--output-json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["runs"][0]["completion_tokens"] == 30
    (hf,) = report["hf"]["hf-dynamic"]
    assert hf["completion_tokens"] == 30  # two left-padded batches (4 + 2), every prompt its 5 tokens
    assert [row["impl"] for row in report["compare"]] == ["roseinfer", "hf-dynamic"]


def test_steady_step_is_timed_where_every_request_decodes():
    """Two requests: the second's prompt is prefilled while the first decodes slowly (10 ms a
    token), then both decode at 2 ms a step until the first ends. The steady step is 2 ms, which
    the first request's TPOT (its slow start included) is not."""
    from engine.bench import STEADY_MIN_TOKENS, steady_decode_step_s

    tokens = STEADY_MIN_TOKENS + 8
    slow = [(0.010 * i, i) for i in range(1, 11)]  # tokens 1..10 while the other prompt is prefilled
    both_from = 0.100
    fast = [(both_from + 0.002 * j, 10 + j) for j in range(1, tokens + 1)]
    first_request = slow + fast
    second_request = [(both_from + 0.002 * j, j) for j in range(1, tokens + 1)]
    first = [first_request[0][0], second_request[0][0]]
    finish = [first_request[-1][0], second_request[-1][0] + 0.5]
    step = steady_decode_step_s(first, finish, [first_request, second_request])
    assert abs(step - 0.002) < 1e-9
    tpot_first = (first_request[-1][0] - first_request[0][0]) / (len(first_request) - 1)
    assert tpot_first > 0.0025

    # A request with too few tokens inside the window: not timed (TPOT is used instead)
    short = [(both_from + 0.002 * j, j) for j in range(1, 4)]
    assert steady_decode_step_s([first[0], short[0][0]], [first_request[-1][0], short[-1][0]],
                                [first_request, short]) is None
