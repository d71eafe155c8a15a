"""How close the paged-decode kernel runs to the copy rate at one decode shape, with and without a
shared prompt prefix (the real-traffic workload: every sequence's first blocks are the same cache
blocks, as the prefix cache leaves them), for the launch table's choice and the best of the tuner's
candidates at this shape, and with a shared prefix also `cascade_decode` (the prefix read once per
KV head for all queries). Timed as a decode step sees it: back to back in a CUDA graph over enough
layers of K/V that L2 holds none of the next one.

    python scripts/decode_attention_bw.py --shape gpt2 --batch 128 --context 600 --shared-prefix 256
    python scripts/decode_attention_bw.py --shape llama-3.1-8b --batch 64 --context 256
    python scripts/decode_attention_bw.py --shape gpt2 --sweep --context 64   # where cascade starts to pay
    python scripts/decode_attention_bw.py --shape llama-3.1-8b --batch 64 --context 3840 --shared-prefix 0 \
        --kv-cache-dtype fp8 [--widen-with-to]   # an e4m3 cache (--kv-cache-dtype fp8)

Bytes are the K/V each step must read from memory: the shared prefix once, every sequence's own
tokens once. The kernel re-reads the prefix for every sequence (from L2, if it stays there).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch

from engine.bench import measure_copy_rate
from roseinfer_kernels.launch_table import cascade_prefix_launch, decode_launch
from roseinfer_kernels.tune import SHAPES, candidates, graph_us_per_call, make_inputs
from roseinfer_kernels.paged_attention import PrefixLaunch, cascade_decode, paged_decode


def layer_inputs(batch: int, context: int, prefix: int, heads: int, kv_heads: int, dim: int, dtype, block: int = 16,
                 cache_dtype=None):
    """make_inputs' tensors, with each sequence's first prefix // block table entries pointing at
    the same blocks (the first sequence's); the caches in `cache_dtype` when given (e4m3)."""
    q, k, v, tables, lens = make_inputs(batch, context, heads, kv_heads, dim, dtype, block,
                                        fp8_cache=cache_dtype is not None)
    shared = prefix // block
    if shared:
        tables[:, :shared] = tables[0, :shared]
    return q, k, v, tables, lens


def layers_past_l2(batch: int, context: int, prefix: int, heads: int, kv_heads: int, dim: int, dtype, cache_dtype=None):
    """Enough layers' layer_inputs (2-16, about 256 MB of K/V loaded) that L2 holds none of the next
    one when a graph runs them in turn, and an output per layer."""
    read_bytes = batch * context * 2 * kv_heads * dim * torch.tensor([], dtype=cache_dtype or dtype).element_size()
    layers = [layer_inputs(batch, context, prefix, heads, kv_heads, dim, dtype, cache_dtype=cache_dtype)
              for _ in range(min(16, max(2, math.ceil(2**28 / read_bytes))))]
    return layers, [torch.empty_like(layer[0]) for layer in layers]


def measure(args, prefix: int) -> dict:
    name, heads, kv_heads, dim, dtype = next(s for s in SHAPES if s[0] == args.shape)
    cache_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else None
    elem = torch.tensor([], dtype=cache_dtype or dtype).element_size()
    token_bytes = 2 * kv_heads * dim * elem
    unique_bytes = (args.batch * (args.context - prefix) + prefix) * token_bytes
    read_bytes = args.batch * args.context * token_bytes  # what the kernel loads, prefix included
    layers, outs = layers_past_l2(args.batch, args.context, prefix, heads, kv_heads, dim, dtype, cache_dtype)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    tuned = decode_launch(str(dtype).removeprefix("torch."), dim, heads // kv_heads, 16, args.batch, kv_heads, num_sms,
                          fp8_cache=cache_dtype is not None)

    def us_of(launch) -> float:
        return graph_us_per_call([lambda a=a, o=o: paged_decode(*a, dim**-0.5, launch, out=o, pdl=True)
                                  for a, o in zip(layers, outs)], 5, 10)

    table_us = us_of(tuned)
    best_us, best = table_us, tuned
    for launch in candidates(args.batch, kv_heads, dim, num_sms):
        try:
            us = us_of(launch)
        except Exception:  # out of shared memory for this shape
            continue
        if us < best_us:
            best_us, best = us, launch
    result = {"prefix": prefix, "unique_mb": unique_bytes / 1e6, "read_mb": read_bytes / 1e6,
              "table": {"launch": vars(tuned), "us": table_us, "unique_tb_s": unique_bytes / table_us / 1e6,
                        "read_tb_s": read_bytes / table_us / 1e6},
              "best": {"launch": vars(best), "us": best_us, "unique_tb_s": unique_bytes / best_us / 1e6}}
    if prefix:  # the shared prefix read once per KV head for all queries (roseinfer_kernels.paged_attention.cascade_decode)
        cascade = []
        prefix_len = torch.tensor([prefix], dtype=torch.int32, device="cuda")
        for block_q, tokens, warps in itertools.product((16, 32, 64, 128), (32, 64), (4, 8)):
            pl = PrefixLaunch(block_q=block_q, tokens=tokens, num_warps=warps)
            try:
                us = graph_us_per_call([lambda a=a, o=o, pl=pl: cascade_decode(*a, dim**-0.5, prefix_len, best, pl, out=o)
                                        for a, o in zip(layers, outs)], 5, 10)
            except Exception:  # out of shared memory for this shape
                continue
            cascade.append((us, vars(pl)))
        us, pl = min(cascade, key=lambda c: c[0])
        result["cascade"] = {"prefix_launch": pl, "decode_launch": vars(best), "us": us,
                             "unique_tb_s": unique_bytes / us / 1e6}
    return result


def sweep(args) -> list[dict]:
    """Where cascade_decode starts to pay (engine.model_runner's CASCADE_MIN_BATCH and
    CASCADE_MIN_SHARED_TOKENS): the engine's launches (the table's paged one, the default prefix
    launch) at each batch and shared-prefix length, each sequence `args.context` tokens past it."""
    name, heads, kv_heads, dim, dtype = next(s for s in SHAPES if s[0] == args.shape)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for batch in (8, 16, 32, 64, 128):
        launch = decode_launch(str(dtype).removeprefix("torch."), dim, heads // kv_heads, 16, batch, kv_heads, num_sms)
        for prefix in (32, 64, 128, 256, 512):
            layers, outs = layers_past_l2(batch, prefix + args.context, prefix, heads, kv_heads, dim, dtype)
            prefix_len = torch.tensor([prefix], dtype=torch.int32, device="cuda")
            paged = graph_us_per_call([lambda a=a, o=o: paged_decode(*a, dim**-0.5, launch, out=o, pdl=True)
                                       for a, o in zip(layers, outs)], 5, 10)
            cascade = graph_us_per_call([lambda a=a, o=o: cascade_decode(*a, dim**-0.5, prefix_len, launch,
                                                                         cascade_prefix_launch(dim), out=o)
                                         for a, o in zip(layers, outs)], 5, 10)
            rows.append({"batch": batch, "prefix": prefix, "paged_us": paged, "cascade_us": cascade})
            print(f"  batch {batch:4d} prefix {prefix:4d} (+{args.context}): paged {paged:6.1f} us, "
                  f"cascade {cascade:6.1f} us = {cascade / paged:.2f}x", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="gpt2", help="a name from roseinfer_kernels.tune.SHAPES")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--context", type=int, default=600)
    p.add_argument("--shared-prefix", type=int, default=256, help="tokens every sequence shares (0: none)")
    p.add_argument("--json", default=None)
    p.add_argument("--sweep", action="store_true",
                   help="the engine's launches, paged vs cascade, over batch sizes and prefix lengths (each "
                        "sequence --context tokens past its prefix)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help="fp8: the caches in e4m3")
    p.add_argument("--widen-with-to", action="store_true",
                   help="experiment: the kernel widens an e4m3 cache with `.to` instead of linear.widen_e4m3")
    args = p.parse_args()
    if args.widen_with_to:  # before the first compile: the kernels read this global at compile time
        import triton.language as tl

        import roseinfer_kernels.paged_attention as paged_attention
        paged_attention.INTERPRETED = tl.constexpr(True)
    if args.sweep:
        print(f"{args.shape}: paged_decode vs cascade_decode, the engine's launches")
        rows = sweep(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"shape": args.shape, "context_past_prefix": args.context, "sweep": rows}, f, indent=1)
        return
    # The rate the bench's floors divide by, from eager copies: one captured in a CUDA graph (a
    # memcpy node) measured 2.76 TB/s on the H200, against 4.2 for the bench's in the same hour
    copy_tb_s = measure_copy_rate(torch.device("cuda")) / 1e12  # read + write
    results = {"shape": args.shape, "batch": args.batch, "context": args.context, "copy_tb_s": copy_tb_s,
               "kv_cache_dtype": args.kv_cache_dtype, "widen_with_to": args.widen_with_to, "runs": []}
    print(f"{args.shape}, batch {args.batch}, context {args.context}, cache {args.kv_cache_dtype}"
          f"{' (widened with .to)' if args.widen_with_to else ''}; device copy {copy_tb_s:.2f} TB/s (read + write)")
    for prefix in sorted({0, args.shared_prefix}):
        r = measure(args, prefix)
        results["runs"].append(r)
        t, b = r["table"], r["best"]
        print(f"  shared prefix {prefix:5d}: {r['unique_mb']:.1f} MB unique K/V ({r['read_mb']:.1f} MB loaded) a layer; "
              f"table {t['us']:.1f} us = {t['unique_tb_s']:.2f} TB/s unique ({t['unique_tb_s'] / copy_tb_s:.0%} of copy), "
              f"{t['read_tb_s']:.2f} TB/s loaded [{t['launch']}]; best candidate {b['us']:.1f} us [{b['launch']}]")
        if "cascade" in r:
            c = r["cascade"]
            print(f"    cascade (prefix once per KV head): {c['us']:.1f} us = {c['unique_tb_s']:.2f} TB/s unique "
                  f"[{c['prefix_launch']}] = {c['us'] / b['us']:.2f}x the best paged launch")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
