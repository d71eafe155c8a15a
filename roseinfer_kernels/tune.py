"""Measure decode-kernel launch candidates on this GPU and write the launch table.

    python -m roseinfer_kernels.tune --out roseinfer_kernels/tuned_launch.json       # tune attention, write the table
    python -m roseinfer_kernels.tune --linear 6144x4096,4096x4096 --dtype bfloat16 --out roseinfer_kernels/tuned_launch.json
                                                                  # tune projections [N x K] (cuBLAS or ours)
    python -m roseinfer_kernels.tune --experiment --json out.json           # the three-variant experiment + bandwidth

The table is read once by the engine (roseinfer_kernels/launch_table.py); nothing
here runs on the serving path.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

from roseinfer_kernels.launch_table import (
    BATCH_BUCKETS,
    FP8_CACHE_KEY,
    PREQUANTIZED_KEY,
    QUANTIZE_FIRST_KEY,
    decode_key,
    heuristic_decode_launch,
    heuristic_linear_launch,
    linear_key,
    load_table,
)
from roseinfer_kernels.fp8 import (FP8, fake_quantize_slices_fp8, quantize_rows_fp8, quantize_tokens_fp8, scaled_mm_fp8,
                                  scaled_mm_prequantized)
from roseinfer_kernels.fp8_rows import quantize_rows
from roseinfer_kernels.linear import LinearLaunch, SplitKWorkspace, skinny_linear, tile_rows
from roseinfer_kernels.norm import add_norm
from roseinfer_kernels.paged_attention import LOG2E, DecodeLaunch, _paged_decode_kernel, paged_decode

TUNED_BUCKETS = (1, 4, 16, 32, 64, 128, 256)  # other batch sizes map to these buckets' neighbours or the heuristic
# (name, num_heads, num_kv_heads, head_dim, dtype)
SHAPES = [
    ("gpt2", 12, 12, 64, torch.float16),
    ("smollm2", 9, 3, 64, torch.bfloat16),
    ("llama-3.1-8b", 32, 8, 128, torch.bfloat16),  # also Mistral-7B
    ("llama-3.2-1b", 32, 8, 64, torch.bfloat16),
    ("qwen2.5-7b", 28, 4, 128, torch.bfloat16),
]


def make_inputs(num_seqs: int, context: int, heads: int, kv_heads: int, dim: int, dtype, block_size: int = 16,
                fp8_cache: bool = False):
    """A decode step's attention inputs; `fp8_cache`: the caches in e4m3."""
    blocks_per_seq = -(-context // block_size)
    num_blocks = num_seqs * blocks_per_seq
    k = torch.randn(num_blocks, kv_heads, block_size, dim, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    if fp8_cache:
        k, v = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(num_seqs, blocks_per_seq).contiguous()
    seq_lens = torch.full((num_seqs,), context, device="cuda", dtype=torch.int32)
    q = torch.randn(num_seqs, heads, dim, device="cuda", dtype=dtype)
    return q, k, v, tables, seq_lens


def candidates(num_seqs: int, kv_heads: int, head_dim: int, num_sms: int):
    programs = num_seqs * kv_heads
    split_options = [1] if programs >= 4 * num_sms else [1, 2, 4, 8]
    warp_options = (2, 4, 8) if head_dim <= 64 else (4, 8)
    for tokens, warps, stages, splits in itertools.product((32, 64, 128), warp_options, (2, 3, 4), split_options):
        yield DecodeLaunch(tokens=tokens, num_splits=splits, num_warps=warps, num_stages=stages)


def _compile_decode(jobs: list[tuple[int, int, int, str, dict, bool, bool]]) -> int:
    """Compile decode-attention launches into Triton's on-disk cache (a worker process). The last
    field: an e4m3 cache."""
    done = 0
    for heads, kv_heads, dim, dtype_name, launch, pdl, fp8_cache in jobs:
        q, k, v, tables, lens = make_inputs(2, 64, heads, kv_heads, dim, getattr(torch, dtype_name), fp8_cache=fp8_cache)
        try:
            paged_decode(q, k, v, tables, lens, 0.125, DecodeLaunch(**launch), pdl=pdl)
            done += 1
        except Exception:  # out of shared memory etc.: the measuring pass skips it too
            pass
    torch.cuda.synchronize()
    return done


def _compile_in_workers(fn, jobs: list, workers: int) -> None:
    import multiprocessing as mp

    t0 = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        compiled = sum(pool.map(fn, [jobs[i::workers] for i in range(workers)]))
    print(f"compiled {compiled}/{len(jobs)} launches in {time.time() - t0:.0f} s ({workers} processes)", flush=True)


def tune(contexts: tuple[int, ...], out_path: str, shapes: tuple[str, ...] = (), workers: int = 8,
         fp8_cache: bool = False) -> dict:
    """Per shape and batch bucket, the candidate with the lowest geometric mean of its time relative to
    the best candidate at each context: a CUDA graph keeps one launch for every context it will see,
    and a config that wins at one length can be several times slower at another (tokens=128, 4 warps,
    3 stages: tied for best at context 256, 3.4x the best at 64 on the H100). Launched with
    programmatic dependent launch where the GPU has it, as the engine launches them. `fp8_cache`:
    the caches in e4m3 (--kv-cache-dtype fp8), keyed launch_table.FP8_CACHE_KEY."""
    from roseinfer_kernels.pdl import pdl_supported

    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    pdl = pdl_supported(torch.device("cuda"))
    selected = [s for s in SHAPES if not shapes or s[0] in shapes]
    jobs = sorted({(heads, kv_heads, dim, str(dtype).removeprefix("torch."), tuple(sorted(vars(c).items())), pdl)
                   for _, heads, kv_heads, dim, dtype in selected for bucket in TUNED_BUCKETS
                   for c in candidates(bucket, kv_heads, dim, num_sms)})
    _compile_in_workers(_compile_decode, [(h, kh, d, dt, dict(c), p, fp8_cache) for h, kh, d, dt, c, p in jobs],
                        workers)
    entries: dict[str, dict] = {}
    for name, heads, kv_heads, dim, dtype in selected:
        for bucket in TUNED_BUCKETS:
            launches = list(candidates(bucket, kv_heads, dim, num_sms))
            times: dict[DecodeLaunch, list[float]] = {c: [] for c in launches}
            for context in contexts:
                # As in a decode step: back to back in a CUDA graph, over enough layers of K/V that
                # L2 holds none of the next one (a standalone timing is mostly launch overhead).
                kv_bytes = 2 * bucket * context * kv_heads * dim * (1 if fp8_cache else dtype.itemsize)
                layers = [make_inputs(bucket, context, heads, kv_heads, dim, dtype, fp8_cache=fp8_cache)
                          for _ in range(min(12, max(2, math.ceil(2**28 / kv_bytes))))]
                outs = [torch.empty_like(layer[0]) for layer in layers]
                for launch in list(times):
                    try:
                        us = graph_us_per_call([lambda a=a, o=o, la=launch: paged_decode(*a, 0.125, la, out=o, pdl=pdl)
                                                for a, o in zip(layers, outs)], 5, 10)
                    except Exception:  # e.g. out of shared memory for this shape
                        del times[launch]
                        continue
                    times[launch].append(us / 1e3)
                del layers, outs
            best_at = [min(t[i] for t in times.values()) for i in range(len(contexts))]
            score = {c: math.prod(ms / b for ms, b in zip(t, best_at)) ** (1 / len(contexts)) for c, t in times.items()}
            best = min(score, key=score.get)
            heur = heuristic_decode_launch(dim, heads // kv_heads, bucket, kv_heads, num_sms)
            key = decode_key(FP8_CACHE_KEY if fp8_cache else str(dtype).removeprefix("torch."), dim, heads // kv_heads,
                             16, bucket)
            entries[key] = best.__dict__
            us = " ".join(f"{ms * 1e3:.1f}" for ms in times[best])
            heur_us = " ".join(f"{ms * 1e3:.1f}" for ms in times.get(heur, []))
            print(f"{key:<42} {best}  us at contexts {contexts}: {us}  (x{score[best]:.3f} of per-context best; "
                  f"heuristic {heur_us or 'n/a'})", flush=True)
    return write_table(out_path, entries, contexts=contexts)


def write_table(out_path: str, entries: dict, measured: dict | None = None, contexts: tuple[int, ...] = ()) -> dict:
    """Write the launch table, keeping what the file already records about shapes not tuned now."""
    old = {}
    if os.path.exists(out_path):
        with open(out_path, encoding="utf-8") as f:
            old = json.load(f)
    table = {
        "device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"),
        "contexts": list(contexts) or old.get("contexts", []),
        "entries": {**old.get("entries", {}), **entries},
        "measured": {**old.get("measured", {}), **(measured or {})},
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    load_table.cache_clear()
    return table


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Device time of one replay of a captured `graph`, over `replays` back to back."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def graph_us_per_call(fns: list, rounds: int = 7, replays: int = 20) -> float:
    """Median over rounds of (replay time / calls), for a CUDA graph that runs every fn once in order:
    what a decode step sees (no launch gaps; programmatic dependent launch overlaps neighbours)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = [replay_ms(graph, replays) * 1e3 / len(fns) for _ in range(rounds)]
    del graph
    return sorted(times)[len(times) // 2]


# Batch buckets the projections are measured at; the others take the nearest measured one below.
LINEAR_TUNED_BUCKETS = (1, 4, 16, 32, 64, 128, 256)


def linear_candidates(n: int, k: int, rows: int, num_sms: int, block_ks: tuple[int, ...] = (128, 256),
                      tma: bool = False, weight_bytes: int = 2) -> list[LinearLaunch]:
    """Launches worth measuring for an [n, k] projection at `rows` rows: output tiles of 32-128
    columns (256 too for fp8 weights, `weight_bytes` 1, at 32+ rows), K tiles of `block_ks`
    (float8 weights add 512: the same bytes a tile as 256 of bf16), 3 or 4 stages, and the split-K
    counts that give between one and eight programs per SM (fewer leave bandwidth unused; more
    only add partial sums). At one row also `gemv` launches of 4-64 columns (register FMAs, at
    most 64 fp32 products a thread), whose loads are not pipelined: 1 or 3 stages. `tma`: each
    also with its weight tiles through TMA, where the tile fits a TMA box (K tiles up to 256)."""
    out = []
    m_tiles = triton.cdiv(rows, tile_rows(rows))

    def add(block_n: int, block_k: int, warps: int, stages: int, gemv: bool = False) -> None:
        tiles = triton.cdiv(n, block_n) * (1 if gemv else m_tiles)
        splits = [s for s in (1, 2, 3, 4, 6, 8, 12, 16) if k // s >= block_k and num_sms <= tiles * s <= 8 * num_sms]
        if not splits:  # too few tiles even split 16 ways, or too many unsplit: the nearest one
            splits = [max(1, min(16, k // block_k, round(2 * num_sms / tiles)))]
        for split in splits:
            out.append(LinearLaunch(block_n=block_n, block_k=block_k, split_k=split, num_warps=warps, num_stages=stages,
                                    gemv=gemv))
    for (block_n, warps), block_k, stages in itertools.product(((32, 4), (64, 4), (128, 8)), block_ks, (3, 4)):
        add(block_n, block_k, warps, stages)
    if rows >= 32 and weight_bytes == 1:
        # fp8 weights at 32+ rows: 256-column tiles too. Each program reads its rows' K slice, so
        # narrow tiles load x rows / block_n times the weight's bytes again (twice them at 64 rows
        # and 32 columns). 128-wide K tiles keep a stage at 40-48 KB of shared memory (bf16
        # weights' 80 KB would not fit 3 stages); not yet measured
        for stages in (3, 4):
            add(256, 128, 8, stages)
    if rows == 1:
        # (4 or 8 columns: a warp each, so no thread loads x's slice again for another row)
        for (block_n, block_k, warps), stages in itertools.product(
                ((16, 512, 4), (32, 256, 4), (16, 1024, 8), (32, 512, 8), (64, 256, 8), (4, 1024, 4), (8, 1024, 8),
                 (4, 2048, 4)), (1, 3)):
            if block_k <= k:
                add(block_n, block_k, warps, stages, gemv=True)
    return out + [dataclasses.replace(c, tma=True) for c in out if tma and c.block_k <= 256]


def _compile_linear(jobs: list[tuple[int, int, bool, str, bool, int, dict, bool]]) -> int:
    """Compile launches into Triton's on-disk cache (a worker process: compilation is CPU work,
    and the measuring process then only loads the binaries). The last field: activations in e4m3."""
    done = 0
    for n, k, bias, dtype_name, fp8, rows, launch, x_fp8 in jobs:
        dtype = getattr(torch, dtype_name)
        x = torch.zeros(rows, k, device="cuda", dtype=FP8 if x_fp8 else dtype)
        w = torch.zeros(n, k, device="cuda", dtype=FP8 if fp8 else dtype)
        scale = torch.ones(n, device="cuda") if fp8 else None
        b = torch.zeros(n, device="cuda", dtype=dtype) if bias else None
        prequant = dict(x_scale=torch.ones(rows, device="cuda"), out=torch.empty(rows, n, device="cuda", dtype=dtype))
        try:
            skinny_linear(x, w, b, False, LinearLaunch(**launch), SplitKWorkspace(), weight_scale=scale,
                          **(prequant if x_fp8 else {}))
            done += 1
        except Exception:  # out of shared memory etc.: the measuring pass skips it too
            pass
    torch.cuda.synchronize()
    return done


def time_if_right(project, first: tuple, want: torch.Tensor, chain_us, norms_us: float, label: str) -> float | None:
    """A candidate projection's microseconds in the timed chain (the chain's less the norms' alone),
    or None, said why, when its result on `first` (weight, scale, bias) is 1% or more off `want` or
    it does not launch."""
    try:
        got = project(*first).float()
        if not ((got - want).norm() / want.norm()).item() < 1e-2:
            print(f"  {label}: wrong result", flush=True)
            return None
        return chain_us(project) - norms_us
    except Exception as exc:  # out of resources
        print(f"  {label}: {type(exc).__name__}", flush=True)
        return None


def tune_linear(shapes: list[tuple[int, int, bool]], dtype: torch.dtype, out_path: str, workers: int = 8,
                buckets: tuple[int, ...] = LINEAR_TUNED_BUCKETS, pdl: bool = True, fp8: bool = False,
                prequantized: bool = False, quantize_first: bool = False, tma: bool = False) -> dict:
    """For each projection [n, k] (bias or not) and batch bucket, time cuBLAS and our skinny kernel's
    candidates in CUDA graphs over enough weight copies that L2 holds none, and record the fastest:
    a launch, or null for cuBLAS. Every bucket in BATCH_BUCKETS gets an entry (the nearest measured
    bucket at or below it). Compilation runs in `workers` processes first. `fp8`: float8 e4m3
    weights with a scale per row (activations in `dtype`), against the per-token-scaled
    `torch._scaled_mm` that FP8 projections use otherwise; the entries are keyed float8_e4m3fn.
    `prequantized` (with `fp8`): the activations arrive in e4m3 with a scale per row, as the norms
    and SiLU * up hand them to FP8 projections, against `torch._scaled_mm` on them as they are;
    keyed PREQUANTIZED_KEY. `quantize_first` (with `prequantized`): each launch times
    roseinfer_kernels.fp8_rows.quantize_rows of the norm's output too (an input no kernel writes in
    e4m3, as o_proj's); keyed QUANTIZE_FIRST_KEY, for the engine to compare with the same shape's
    float8_e4m3fn time. `tma`: the candidates also with TMA weight loads."""
    assert (fp8 or not prequantized) and (prequantized or not quantize_first)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    dtype_name = str(dtype).removeprefix("torch.")
    key_dtype = QUANTIZE_FIRST_KEY if quantize_first else PREQUANTIZED_KEY if prequantized else \
        "float8_e4m3fn" if fp8 else dtype_name
    block_ks = (128, 256, 512) if fp8 else (128, 256)
    plan = {(n, k, bias, b): linear_candidates(n, k, b, num_sms, block_ks, tma, 1 if fp8 else dtype.itemsize)
            + [heuristic_linear_launch(k, 1) or LinearLaunch()] for n, k, bias in shapes for b in buckets}
    if fp8 and not prequantized:  # each launch also with the activations in e4m3 (W8A8) instead of widened weights (W8A16)
        plan = {key: cands + [dataclasses.replace(c, act_fp8=True) for c in cands if not c.gemv]
                for key, cands in plan.items()}
    # One job per compiled variant: buckets with the same row tile share a binary.
    jobs = sorted({(n, k, bias, dtype_name, fp8, tile_rows(b, c), tuple(sorted(vars(dataclasses.replace(c, pdl=pdl)).items())),
                    prequantized)
                   for (n, k, bias, b), cands in plan.items() for c in cands})
    jobs = [(n, k, bias, d, f, b, dict(launch), x8) for n, k, bias, d, f, b, launch, x8 in jobs]
    _compile_in_workers(_compile_linear, jobs, workers)

    entries, measured = {}, {}
    workspace = SplitKWorkspace()
    for n, k, bias in shapes:
        nbytes = n * k * (1 if fp8 else dtype.itemsize)
        copies = max(4, math.ceil(3 * 2**28 / nbytes))  # 768 MB of weights: far more than L2
        weights = [torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5 for _ in range(copies)]
        scales = [None] * copies
        if fp8:
            weights, scales = map(list, zip(*(quantize_rows_fp8(w) for w in weights)))
        biases = [torch.randn(n, device="cuda", dtype=dtype) if bias else None for _ in range(copies)]

        def rows_of(x_in):  # prequantized: (e4m3 rows, their scales), quantized here when quantize_first
            return quantize_rows(x, pdl=pdl) if quantize_first else x_in

        def baseline(x, w, s, b):  # what the projection runs when the skinny kernel does not
            if isinstance(x, tuple):  # prequantized: (e4m3 rows, their scales)
                y = scaled_mm_prequantized(*rows_of(x), w, s, dtype)
            elif fp8:
                y = scaled_mm_fp8(x, w, s)
            else:
                return F.linear(x, w, b)
            return y if b is None else y + b
        # bucket -> (best us, the winning launch or None for cuBLAS, cuBLAS's us, our fastest launch,
        # the winner for the buckets above that take this one's entries: no gemv launch, one row only)
        best_of: dict[int, tuple[float, LinearLaunch | None, float, LinearLaunch | None, LinearLaunch | None]] = {}
        for bucket in buckets:
            # In a step a projection follows a small kernel (a norm, attention, SiLU): time it there,
            # after an RMSNorm that writes its input, so that a launch gap after cuBLAS and the
            # weight prefetch under PDL both count. A projection's time: chain minus norms alone.
            src, residual = torch.randn(bucket, k, device="cuda", dtype=dtype), torch.randn(bucket, k, device="cuda", dtype=dtype)
            norm_weight = torch.ones(k, device="cuda", dtype=dtype)
            x, summed = torch.empty_like(src), torch.empty_like(src)
            out = torch.empty(bucket, n, device="cuda", dtype=dtype)

            def norm():
                add_norm(src, residual, norm_weight, None, 1e-5, True, out=x, sum_out=summed, pdl=pdl)

            def chain_us(project) -> float:
                return graph_us_per_call([lambda w=w, s=s, b=b: (norm(), project(w, s, b))
                                          for w, s, b in zip(weights, scales, biases)], 5, 10)

            norms_us = graph_us_per_call([norm] * copies, 5, 10)
            norm()
            # prequantized: the norm's rows in e4m3 (made once here; in the chain, the norm's own
            # launch stands for the quantizing norm, whose extra arithmetic is in the same pass)
            x_in = x
            if prequantized:
                xq, x_scale = quantize_tokens_fp8(x)
                x_in = (xq, x_scale.view(-1))
            cublas_us = chain_us(lambda w, s, b: baseline(x_in, w, s, b)) - norms_us
            w0 = weights[0] if not fp8 else (weights[0].float() * scales[0][:, None]).to(dtype)
            ref = F.linear(x, w0, biases[0]).float()  # what the skinny kernel must give
            if prequantized:
                ref = F.linear(x_in[0].float() * x_in[1][:, None], w0.float(),
                               None if biases[0] is None else biases[0].float())
            timed = []
            for cand in plan[(n, k, bias, bucket)]:
                launch = dataclasses.replace(cand, pdl=pdl)
                want = ref
                if launch.act_fp8:  # the product of the activations as the kernel quantizes them
                    want = F.linear(fake_quantize_slices_fp8(x, launch.block_k).to(dtype), w0, biases[0]).float()

                def project(w, s, b, la=launch):
                    if prequantized:
                        xq, x_scale = rows_of(x_in)
                        return skinny_linear(xq, w, b, False, la, workspace, out=out, weight_scale=s, x_scale=x_scale)
                    return skinny_linear(x, w, b, False, la, workspace, out=out, weight_scale=s)
                us = time_if_right(project, (weights[0], scales[0], biases[0]), want, chain_us, norms_us,
                                   f"{n}x{k} b{bucket} {launch}")
                if us is not None:
                    timed.append((us, launch))
            timed.sort(key=lambda t: t[0])
            ours_us, ours = timed[0] if timed else (math.inf, None)
            winner = ours if ours_us < cublas_us else None
            tiled_us, tiled = next(((us, la) for us, la in timed if not la.gemv), (math.inf, None))
            best_of[bucket] = (min(ours_us, cublas_us), winner, cublas_us, ours, tiled if tiled_us < cublas_us else None)
            print(f"linear {key_dtype} {n}x{k}{'+bias' if bias else ''} b{bucket} ({nbytes / 1e6:.1f} MB, after a norm of "
                  f"{norms_us:.1f} us): cuBLAS{'Lt fp8' if fp8 else ''} {cublas_us:.1f} us ({nbytes / cublas_us / 1e6:.2f} TB/s); ours {ours_us:.1f} us "
                  f"({nbytes / ours_us / 1e6:.2f} TB/s) {ours} -> {'ours' if winner else 'cuBLAS'}", flush=True)
        for bucket in BATCH_BUCKETS:
            # A bucket takes the nearest tuned bucket at or below it; when only some buckets are
            # measured now, the others keep their entries.
            measured_at = max((b for b in LINEAR_TUNED_BUCKETS if b <= bucket), default=LINEAR_TUNED_BUCKETS[0])
            if measured_at not in best_of:
                continue
            us, winner, cublas_us, ours, more_rows_winner = best_of[measured_at]
            if bucket > 1:
                winner = more_rows_winner
            key = linear_key(key_dtype, n, k, bucket)
            entries[key] = None if winner is None else {f: v for f, v in vars(winner).items() if f != "pdl"}
            if measured_at == bucket:
                measured[key] = {"us": round(us, 2), "cublas_us": round(cublas_us, 2), "tb_s": round(nbytes / us / 1e6, 3),
                                 "ours": None if ours is None else {f: v for f, v in vars(ours).items() if f != "pdl"}}
        weights = scales = biases = None  # this shape's copies freed before the next
        # Written after every shape: a run cut short by a time limit keeps what it measured.
        write_table(out_path, entries, measured)
    return write_table(out_path, entries, measured)


def experiment(json_path: str | None) -> dict:
    """Fixed num_warps=4 vs @triton.autotune on every call vs the tuned table, on one workload:
    GPT-2 decode attention (12 layers a step, batch 64, context 512, fp16), launched from a host loop."""
    from roseinfer_kernels.launch_table import decode_launch

    heads, kv_heads, dim, dtype, layers, batch, context = 12, 12, 64, torch.float16, 12, 64, 512
    q, k, v, tables, lens = make_inputs(batch, context, heads, kv_heads, dim, dtype)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    configs = [triton.Config({"TOKENS": t}, num_warps=w, num_stages=s) for t in (32, 64, 128, 256) for w in (2, 4, 8) for s in (2, 3, 4)]
    autotuned = triton.autotune(configs=configs, key=["GROUP", "HEAD_DIM", "BLOCK_SIZE"])(_paged_decode_kernel)
    out = torch.empty_like(q)

    def launch_autotuned():
        autotuned[(batch, kv_heads, 1)](
            q, k, v, tables, lens, out, out, out, 0.125 * LOG2E, 1.0, 0,
            q.stride(0), q.stride(1), k.stride(0), k.stride(2), k.stride(1), tables.stride(0), out.stride(0), out.stride(1),
            GROUP=1, QROWS=16, HEAD_DIM=dim, BLOCK_SIZE=16, NUM_SPLITS=1, IEEE=False, DOT_FP32=False,
            FP8_CACHE=False, USE_PDL=False,
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


def parse_buckets(text: str) -> tuple[int, ...]:
    """'1,4' -> (1, 4); '' -> every tuned bucket. Only buckets of LINEAR_TUNED_BUCKETS: the table's
    other buckets take their entries from these."""
    buckets = tuple(int(b) for b in text.split(",") if b) or LINEAR_TUNED_BUCKETS
    unknown = set(buckets) - set(LINEAR_TUNED_BUCKETS)
    if unknown:
        raise SystemExit(f"--buckets must be among {LINEAR_TUNED_BUCKETS}, not {sorted(unknown)}")
    return buckets


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="roseinfer_kernels/tuned_launch.json")
    p.add_argument("--contexts", default="64,256,1024", help="context lengths the table is tuned over")
    p.add_argument("--shapes", default="", help="comma-separated names from SHAPES to tune (default: all)")
    p.add_argument("--linear", default="", help="projections to tune instead: NxK[+bias],... (e.g. 6144x4096)")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the --linear projections (their activations)")
    p.add_argument("--weights", choices=["dense", "fp8"], default="dense",
                   help="fp8: float8 e4m3 weights with a scale per row (--quantization fp8), keyed float8_e4m3fn")
    p.add_argument("--prequantized", action="store_true",
                   help="with --weights fp8: activations arriving in e4m3 with a scale per row (as the norms and "
                        "SiLU * up give FP8 projections), keyed float8_e4m3fn-prequantized")
    p.add_argument("--workers", type=int, default=8, help="processes compiling --linear candidates")
    p.add_argument("--buckets", default="", help="--linear: the batch buckets to measure (default: all of "
                   "LINEAR_TUNED_BUCKETS); the others keep their entries")
    p.add_argument("--tma", action="store_true", help="--linear: also the launches with TMA weight loads (Hopper)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="fp8: decode attention over e4m3 caches (--kv-cache-dtype fp8), keyed float8_e4m3fn")
    p.add_argument("--experiment", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.experiment:
        experiment(args.json)
    elif args.linear:
        shapes = []
        for item in args.linear.split(","):
            nk, _, bias = item.partition("+")
            n, k = map(int, nk.split("x"))
            shapes.append((n, k, bias == "bias"))
        tune_linear(shapes, getattr(torch, args.dtype), args.out, args.workers, fp8=args.weights == "fp8",
                    prequantized=args.prequantized, buckets=parse_buckets(args.buckets), tma=args.tma)
    else:
        tune(tuple(int(c) for c in args.contexts.split(",")), args.out, tuple(filter(None, args.shapes.split(","))),
             args.workers, fp8_cache=args.kv_cache_dtype == "fp8")


if __name__ == "__main__":
    main()
