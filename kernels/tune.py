"""Measure decode-kernel launch candidates on this GPU and write the launch table.

    python -m kernels.tune --out kernels/tuned_launch.json       # tune, write the table
    python -m kernels.tune --experiment --json out.json           # the three-variant experiment + bandwidth

The table is read once by the engine (kernels/launch_table.py); nothing
here runs on the serving path.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import torch
import triton
import triton.testing

from kernels.launch_table import decode_key, heuristic_decode_launch, load_table
from kernels.paged_attention import LOG2E, DecodeLaunch, _paged_decode_kernel, paged_decode

TUNED_BUCKETS = (1, 4, 16, 32, 64, 128, 256)  # other batch sizes map to these buckets' neighbours or the heuristic
# (name, num_heads, num_kv_heads, head_dim, dtype)
SHAPES = [
    ("gpt2", 12, 12, 64, torch.float16),
    ("smollm2", 9, 3, 64, torch.bfloat16),
]


def make_inputs(num_seqs: int, context: int, heads: int, kv_heads: int, dim: int, dtype, block_size: int = 16):
    blocks_per_seq = -(-context // block_size)
    num_blocks = num_seqs * blocks_per_seq
    k = torch.randn(num_blocks, kv_heads, block_size, dim, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(num_seqs, blocks_per_seq).contiguous()
    seq_lens = torch.full((num_seqs,), context, device="cuda", dtype=torch.int32)
    q = torch.randn(num_seqs, heads, dim, device="cuda", dtype=dtype)
    return q, k, v, tables, seq_lens


def candidates(num_seqs: int, kv_heads: int, group: int, num_sms: int):
    programs = num_seqs * kv_heads
    split_options = [1] if programs >= 4 * num_sms else [1, 2, 4, 8]
    for tokens, warps, stages, splits in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4), split_options):
        yield DecodeLaunch(tokens=tokens, num_splits=splits, num_warps=warps, num_stages=stages)


def tune(contexts: tuple[int, ...], out_path: str, shapes: tuple[str, ...] = ()) -> dict:
    """Per shape and batch bucket, the candidate with the lowest geometric mean of its time relative to
    the best candidate at each context: a CUDA graph keeps one launch for every context it will see,
    and a config that wins at one length can be several times slower at another (tokens=128, 4 warps,
    3 stages: tied for best at context 256, 3.4x the best at 64 on the H100)."""
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    entries: dict[str, dict] = dict(load_table(out_path))  # shapes not tuned now keep their entries
    for name, heads, kv_heads, dim, dtype in SHAPES:
        if shapes and name not in shapes:
            continue
        for bucket in TUNED_BUCKETS:
            launches = list(candidates(bucket, kv_heads, heads // kv_heads, num_sms))
            times: dict[DecodeLaunch, list[float]] = {c: [] for c in launches}
            for context in contexts:
                q, k, v, tables, lens = make_inputs(bucket, context, heads, kv_heads, dim, dtype)
                out = torch.empty_like(q)
                for launch in list(times):
                    try:
                        ms = triton.testing.do_bench(lambda: paged_decode(q, k, v, tables, lens, 0.125, launch, out=out),
                                                     warmup=5, rep=20, return_mode="median")
                    except Exception:  # e.g. out of shared memory for this shape
                        del times[launch]
                        continue
                    times[launch].append(ms)
            best_at = [min(t[i] for t in times.values()) for i in range(len(contexts))]
            score = {c: math.prod(ms / b for ms, b in zip(t, best_at)) ** (1 / len(contexts)) for c, t in times.items()}
            best = min(score, key=score.get)
            heur = heuristic_decode_launch(dim, heads // kv_heads, bucket, kv_heads, num_sms)
            key = decode_key(str(dtype).removeprefix("torch."), dim, heads // kv_heads, 16, bucket)
            entries[key] = best.__dict__
            us = " ".join(f"{ms * 1e3:.1f}" for ms in times[best])
            heur_us = " ".join(f"{ms * 1e3:.1f}" for ms in times.get(heur, []))
            print(f"{key:<42} {best}  us at contexts {contexts}: {us}  (x{score[best]:.3f} of per-context best; "
                  f"heuristic {heur_us or 'n/a'})", flush=True)
    table = {"device": torch.cuda.get_device_name(0), "contexts": list(contexts), "date": time.strftime("%Y-%m-%d"),
             "entries": entries}
    with open(out_path, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    return table


def experiment(json_path: str | None) -> dict:
    """Fixed num_warps=4 vs @triton.autotune on every call vs the tuned table, on one workload:
    GPT-2 decode attention (12 layers a step, batch 64, context 512, fp16), launched from a host loop."""
    from kernels.launch_table import decode_launch

    heads, kv_heads, dim, dtype, layers, batch, context = 12, 12, 64, torch.float16, 12, 64, 512
    q, k, v, tables, lens = make_inputs(batch, context, heads, kv_heads, dim, dtype)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    configs = [triton.Config({"TOKENS": t}, num_warps=w, num_stages=s) for t in (32, 64, 128, 256) for w in (2, 4, 8) for s in (2, 3, 4)]
    autotuned = triton.autotune(configs=configs, key=["GROUP", "HEAD_DIM", "BLOCK_SIZE"])(_paged_decode_kernel)
    out = torch.empty_like(q)

    def launch_autotuned():
        autotuned[(batch, kv_heads, 1)](
            q, k, v, tables, lens, out, out, out, 0.125 * LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), tables.stride(0), out.stride(0), out.stride(1),
            GROUP=1, QROWS=16, HEAD_DIM=dim, BLOCK_SIZE=16, NUM_SPLITS=1, IEEE=False, DOT_FP32=False,
        )

    fixed = DecodeLaunch(tokens=64, num_splits=1, num_warps=4, num_stages=2)
    tuned = decode_launch("float16", dim, 1, 16, batch, kv_heads, num_sms)
    variants = {
        "fixed_num_warps_4": lambda: paged_decode(q, k, v, tables, lens, 0.125, fixed, out=out),
        "autotune_every_call": launch_autotuned,
        "tuned_table": lambda: paged_decode(q, k, v, tables, lens, 0.125, tuned, out=out),
    }
    for fn in variants.values():  # compile and let autotune settle
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    steps = 300
    results = {}
    for rnd in range(7):  # interleave rounds so drift hits every variant alike
        for name, fn in variants.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                for _ in range(layers):
                    fn()
            torch.cuda.synchronize()
            results.setdefault(name, []).append((time.perf_counter() - t0) / steps * 1e6)
    summary = {name: sorted(v)[len(v) // 2] for name, v in results.items()}  # median of the rounds, us per step
    best = {name: min(v) for name, v in results.items()}
    gpu_us = {name: triton.testing.do_bench(lambda fn=fn: [fn() for _ in range(layers)], warmup=20, rep=200, return_mode="median") * 1e3
              for name, fn in variants.items()}
    base = summary["fixed_num_warps_4"]
    print(f"\nexperiment: GPT-2 decode attention, {layers} launches/step, batch {batch}, context {context}, fp16")
    for name, us in summary.items():
        print(f"  {name:<22} host loop median {us:8.1f} us/step (min {best[name]:7.1f})  {us / base:6.3f}x of fixed   "
              f"GPU-timed {gpu_us[name]:7.1f} us/step")
    print(f"  tuned launch: {tuned}")

    # Bandwidth: batch 64, context 2048, GPT-2 heads, fp16, against a device-to-device copy.
    q, k, v, tables, lens = make_inputs(64, 2048, 12, 12, 64, torch.float16)
    bw_launch = decode_launch("float16", 64, 1, 16, 64, 12, num_sms)
    ms = triton.testing.do_bench(lambda: paged_decode(q, k, v, tables, lens, 0.125, bw_launch, out=torch.empty_like(q)), warmup=10, rep=100, return_mode="median")
    kv_bytes = 2 * 64 * 2048 * 12 * 64 * 2
    src = torch.empty(2 * 1024**3 // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=100, return_mode="median")
    copy_bw = 2 * src.numel() * 2 / (copy_ms * 1e-3)
    kernel_bw = kv_bytes / (ms * 1e-3)
    print(f"\nbandwidth: decode kernel {ms*1e3:.1f} us for {kv_bytes/1e6:.0f} MB of K/V = {kernel_bw/1e12:.2f} TB/s; "
          f"device copy {copy_bw/1e12:.2f} TB/s (read+write); ratio {kernel_bw/copy_bw:.1%}  [{bw_launch}]")
    report = {"device": torch.cuda.get_device_name(0), "experiment_us_per_step": summary, "rounds": results, "gpu_timed_us": gpu_us,
              "tuned_launch": tuned.__dict__, "bandwidth": {"kernel_ms": ms, "kv_bytes": kv_bytes, "kernel_tb_s": kernel_bw / 1e12,
                                                            "copy_tb_s": copy_bw / 1e12, "ratio": kernel_bw / copy_bw}}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    return report


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="kernels/tuned_launch.json")
    p.add_argument("--contexts", default="64,256,1024", help="context lengths the table is tuned over")
    p.add_argument("--shapes", default="", help="comma-separated names from SHAPES to tune (default: all)")
    p.add_argument("--experiment", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.experiment:
        experiment(args.json)
    else:
        tune(tuple(int(c) for c in args.contexts.split(",")), args.out, tuple(filter(None, args.shapes.split(","))))


if __name__ == "__main__":
    main()
