"""Decode-step parts on the GPU, timed the way a decode step runs them: inside a CUDA graph,
over enough distinct weights / caches that nothing stays in L2 between uses.

    python scripts/step_parts.py linear --batch 64 --json out.json      # cuBLAS vs roseinfer_kernels/linear.py
    python scripts/step_parts.py attention --contexts 64,256,512         # decode-attention launches
    python scripts/step_parts.py layer --contexts 64,256                 # whole GPT-2 layers, 5 variants

Prints the per-call time of each candidate (graph replay time / calls in the graph).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import random
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from roseinfer_kernels.linear import LinearLaunch, SplitKWorkspace, skinny_linear
from roseinfer_kernels.paged_attention import LOG2E, DecodeLaunch, paged_decode
from roseinfer_kernels.tune import graph_us_per_call, make_inputs

# (name, N, K, gelu) per model: the four decode projections of a layer
LINEAR_SHAPES = {
    "gpt2": [("qkv", 2304, 768, False), ("out", 768, 768, False), ("fc1", 3072, 768, True), ("fc2", 768, 3072, False)],
    "smollm2": [("qkv", 960, 576, False), ("out", 576, 576, False), ("gate_up", 3072, 576, False),
                ("down", 576, 1536, False)],
}


def linear_candidates(n: int, k: int) -> list[LinearLaunch]:
    """Shuffled (fixed seed), so that a time budget cuts a uniform sample rather than a corner."""
    cands = [LinearLaunch(block_n=bn, block_k=bk, split_k=sk, num_warps=w, num_stages=st, pdl=pdl)
             for bn, bk, sk, w, st, pdl in itertools.product((16, 32, 64, 128), (64, 128, 256), (1, 2, 3, 4, 6, 8),
                                                             (2, 4), (3, 4), (False, True))
             if bk * sk <= k and (n // bn) * sk <= 2048]
    random.Random(0).shuffle(cands)
    return cands


def sweep_linear(model: str, batch: int, dtype: torch.dtype, top: int, budget_s: float) -> dict:
    results = {}
    workspace = SplitKWorkspace()
    layers = 12
    for name, n, k, gelu in LINEAR_SHAPES[model]:
        copies = max(12, math.ceil(200e6 / (n * k * 2)))
        weights = [torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5 for _ in range(copies)]
        biases = [torch.randn(n, device="cuda", dtype=dtype) for _ in range(copies)]
        x = torch.randn(batch, k, device="cuda", dtype=dtype)
        out = torch.empty(batch, n, device="cuda", dtype=dtype)

        def cublas(w, b):
            return torch._addmm_activation(b, x, w.t(), use_gelu=True) if gelu else F.linear(x, w, b)

        base = graph_us_per_call([lambda w=w, b=b: cublas(w, b) for w, b in zip(weights, biases)])
        row = {"cublas_us": base, "mb": n * k * 2 / 1e6}
        ref = cublas(weights[0], biases[0]).float()
        timed = []
        deadline = time.time() + budget_s
        for launch in linear_candidates(n, k, batch, torch.cuda.get_device_properties(0).multi_processor_count):
            if time.time() > deadline:
                row["truncated"] = True
                break
            try:
                got = skinny_linear(x, weights[0], biases[0], gelu, launch, workspace, out=out).float()
                err = ((got - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    print(f"  {name} {launch}: wrong result, rel err {err:.2e}", flush=True)
                    continue
                us = graph_us_per_call([lambda w=w, b=b: skinny_linear(x, w, b, gelu, launch, workspace, out=out)
                                        for w, b in zip(weights, biases)])
            except Exception as exc:  # out of resources etc.
                print(f"  {name} {launch}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            timed.append((us, launch))
        timed.sort(key=lambda r: r[0])
        row["best"] = [{"us": us, **vars(launch)} for us, launch in timed[:top]]
        row["best_no_pdl"] = next(({"us": us, **vars(c)} for us, c in timed if not c.pdl), None)
        results[name] = row
        print(f"{model} b{batch} {name} N={n} K={k} ({row['mb']:.1f} MB): cuBLAS{'+gelu epilogue' if gelu else ''} "
              f"{base:.2f} us; best without PDL {row['best_no_pdl']}", flush=True)
        for us, launch in timed[:top]:
            print(f"    {us:6.2f} us  {launch}", flush=True)
        del weights, biases
    # The layer's four projections in order, 12 layers of distinct weights: what a decode step sees.
    shapes = LINEAR_SHAPES[model]
    ws = [[(torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5, torch.randn(n, device="cuda", dtype=dtype))
           for _, n, k, _ in shapes] for _ in range(layers)]
    xs = [torch.randn(batch, k, device="cuda", dtype=dtype) for _, _, k, _ in shapes]
    outs = [torch.empty(batch, n, device="cuda", dtype=dtype) for _, n, _, _ in shapes]
    chains = {"cublas": [], "triton": [], "triton_pdl": []}
    for layer in ws:
        for (name, n, k, gelu), (w, b), x, o in zip(shapes, layer, xs, outs):
            chains["cublas"].append(
                (lambda w=w, b=b, x=x: torch._addmm_activation(b, x, w.t(), use_gelu=True)) if gelu
                else (lambda w=w, b=b, x=x: F.linear(x, w, b)))
            no_pdl = results[name]["best_no_pdl"]
            best_pdl = next(r for r in results[name]["best"] + [no_pdl] if r)
            for key, entry in (("triton", no_pdl), ("triton_pdl", {**best_pdl, "pdl": True})):
                launch = LinearLaunch(**{f: v for f, v in entry.items() if f != "us"})
                chains[key].append(lambda w=w, b=b, x=x, o=o, g=gelu, la=launch: skinny_linear(x, w, b, g, la, workspace, out=o))
    results["chain_us_per_layer"] = {key: graph_us_per_call(fns) * len(shapes) for key, fns in chains.items()}
    print(f"{model} b{batch} four projections a layer, 12 layers in one graph, us per layer: "
          f"{results['chain_us_per_layer']}", flush=True)
    return results


@triton.jit
def _mha_fma_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, scale_log2,
                    stride_q_tok, stride_q_head, stride_c_block, stride_c_tok, stride_c_head, stride_bt,
                    stride_o_tok, stride_o_head, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    TOKENS: tl.constexpr):
    """Candidate for MHA (one query head per KV head): CUDA-core products, no padded tensor-core tile."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(lens_ptr + seq)
    d = tl.arange(0, HEAD_DIM)
    t = tl.arange(0, TOKENS)
    q = tl.load(q_ptr + seq * stride_q_tok + head * stride_q_head + d).to(tl.float32) * scale_log2
    m = tl.full([1], float("-inf"), tl.float32)
    l = tl.zeros([1], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    bt_row = bt_ptr + seq * stride_bt
    for pos in range(0, seq_len, TOKENS):
        tok = pos + t
        valid = tok < seq_len
        block = tl.load(bt_row + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        off = block * stride_c_block + head * stride_c_head + (tok % BLOCK_SIZE) * stride_c_tok
        k = tl.load(k_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new)
        l = l * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    out = acc / tl.where(l == 0.0, 1.0, l)
    tl.store(out_ptr + seq * stride_o_tok + head * stride_o_head + d, out.to(out_ptr.dtype.element_ty))


def mha_fma(q, k_cache, v_cache, tables, lens, scale, tokens, warps, stages, out):
    _mha_fma_kernel[(q.shape[0], q.shape[1])](
        q, k_cache, v_cache, tables, lens, out, scale * LOG2E, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(2), k_cache.stride(1), tables.stride(0), out.stride(0), out.stride(1),
        HEAD_DIM=q.shape[2], BLOCK_SIZE=k_cache.shape[2], TOKENS=tokens, num_warps=warps, num_stages=stages)
    return out


def sweep_attention(contexts: list[int], batch: int, heads: int, kv_heads: int, top: int) -> dict:
    results = {}
    for context in contexts:
        layers = [make_inputs(batch, context, heads, kv_heads, 64, torch.float16) for _ in range(12)]
        outs = [torch.empty_like(q) for q, *_ in layers]
        timed = []
        for tokens, splits, warps, stages in itertools.product((16, 32, 64, 128), (1, 2), (1, 2, 4), (1, 2, 3)):
            launch = DecodeLaunch(tokens, splits, warps, stages)
            try:
                us = graph_us_per_call([lambda a=a, o=o: paged_decode(*a, 0.125, launch, out=o)
                                        for a, o in zip(layers, outs)])
            except Exception as exc:
                print(f"  ctx {context} {launch}: {type(exc).__name__}", flush=True)
                continue
            timed.append((us, launch))
        if heads == kv_heads:
            ref = paged_decode(*layers[0], 0.125, DecodeLaunch(), out=outs[0]).float()
            for tokens, warps, stages in itertools.product((16, 32, 64, 128), (1, 2, 4), (1, 2, 3)):
                try:
                    got = mha_fma(*layers[0], 0.125, tokens, warps, stages, outs[0]).float()
                    err = ((got - ref).norm() / ref.norm()).item()
                    if not err < 2e-3:
                        print(f"  fma {tokens},{warps},{stages}: wrong, rel err {err:.2e}", flush=True)
                        continue
                    us = graph_us_per_call([lambda a=a, o=o: mha_fma(*a, 0.125, tokens, warps, stages, o)
                                            for a, o in zip(layers, outs)])
                except Exception as exc:
                    print(f"  ctx {context} fma: {type(exc).__name__}", flush=True)
                    continue
                timed.append((us, f"FMA(tokens={tokens}, warps={warps}, stages={stages})"))
        timed.sort(key=lambda r: r[0])
        kv_mb = 2 * batch * context * kv_heads * 64 * 2 / 1e6
        results[context] = [{"us": us, "launch": str(launch)} for us, launch in timed[:top]]
        print(f"attention b{batch} ctx {context} ({kv_mb:.0f} MB K/V a layer):", flush=True)
        for us, launch in timed[:top]:
            print(f"    {us:6.2f} us  {kv_mb / us:5.2f} TB/s  {launch}", flush=True)
        del layers, outs
    return results


def sweep_layer(batch: int, context: int, linear: dict, json_out: dict) -> None:
    """GPT-2 layers (norm, qkv, KV write, attention, out, norm, fc1+GELU, fc2) as a decode step runs
    them, 12 layers of distinct weights and caches in one graph, in several variants."""
    from roseinfer_kernels.kv_cache import write_kv
    from roseinfer_kernels.norm import add_norm

    hidden, heads, dim, inter, dtype = 768, 12, 64, 3072, torch.float16
    workspace = SplitKWorkspace()

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", dtype=dtype) * scale

    layers = []
    for _ in range(12):
        q, k_cache, v_cache, tables, lens = make_inputs(batch, context, heads, heads, dim, dtype)
        pos = context - 1
        slots = (tables[:, pos // 16].long() * 16 + pos % 16).contiguous()
        layers.append(dict(
            ln1=(1 + rand(hidden, scale=0.1), rand(hidden, scale=0.1)), ln2=(1 + rand(hidden, scale=0.1), rand(hidden, scale=0.1)),
            qkv=(rand(3 * hidden, hidden, scale=hidden**-0.5), rand(3 * hidden, scale=0.1)),
            out=(rand(hidden, hidden, scale=hidden**-0.5), rand(hidden, scale=0.1)),
            fc1=(rand(inter, hidden, scale=hidden**-0.5), rand(inter, scale=0.1)),
            fc2=(rand(hidden, inter, scale=inter**-0.5), rand(hidden, scale=0.1)),
            cache=(k_cache, v_cache), tables=tables, lens=lens, slots=slots))
    x0 = rand(batch, hidden)
    bufs = dict(x=x0.clone(), res=rand(batch, hidden), h=torch.empty_like(x0), res2=torch.empty_like(x0),
                attn=torch.empty(batch, heads, dim, device="cuda", dtype=dtype))
    attn_launch = DecodeLaunch(64, 1, 2, 3)

    def step(variant: str):
        tri, pdl, fused_gelu = "triton" in variant, "pdl" in variant, "gelu" in variant or "triton" in variant

        def lin(x, wb, name, gelu=False):
            if tri:
                return skinny_linear(x, wb[0], wb[1], gelu, dataclasses.replace(linear[name], pdl=pdl), workspace)
            if gelu and fused_gelu:
                return torch._addmm_activation(wb[1], x, wb[0].t(), use_gelu=True)
            y = F.linear(x, wb[0], wb[1])
            return F.gelu(y, approximate="tanh") if gelu else y

        x, res = bufs["x"], bufs["res"]
        for L in layers:
            h, res = add_norm(x, res, *L["ln1"], 1e-5, False, out=bufs["h"], sum_out=bufs["res2"], pdl=pdl)
            q, k, v = lin(h, L["qkv"], "qkv").view(batch, 3, heads, dim).unbind(1)
            write_kv(k, v, *L["cache"], L["slots"], pdl=pdl)
            o = paged_decode(q, *L["cache"], L["tables"], L["lens"], 0.125, attn_launch, out=bufs["attn"], pdl=pdl)
            o = lin(o.view(batch, hidden), L["out"], "out")
            h, res = add_norm(o, res, *L["ln2"], 1e-5, False, out=bufs["h"], sum_out=bufs["res"], pdl=pdl)
            x = lin(lin(h, L["fc1"], "fc1", gelu=True), L["fc2"], "fc2")
        return x

    # Timing only: the residual buffers are updated in place, so repeated steps see other inputs
    # (the kernels' results are checked in the linear sweep above and in tests/kernels).
    results = {}
    for variant in ("cublas", "cublas_gelu", "cublas_gelu_pdl", "triton", "triton_pdl"):
        us = graph_us_per_call([lambda v=variant: step(v)]) / 12
        results[variant] = {"us_per_layer": us}
        print(f"layer b{batch} ctx {context} {variant:16s} {us:6.2f} us a layer", flush=True)
    json_out[f"layer_b{batch}_ctx{context}"] = results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("linear", "attention", "layer"))
    p.add_argument("--model", default="gpt2", choices=sorted(LINEAR_SHAPES))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--contexts", default="64,256,512")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=12)
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=60.0, help="per linear shape")
    p.add_argument("--json")
    args = p.parse_args()
    dtype = torch.float16 if args.model == "gpt2" else torch.bfloat16
    if args.what in ("linear", "layer"):
        res = sweep_linear(args.model, args.batch, dtype, args.top, args.budget_s)
        if args.what == "layer":
            best = {name: LinearLaunch(**{f: v for f, v in row["best"][0].items() if f != "us"})
                    for name, row in res.items() if isinstance(row, dict) and row.get("best")}
            for context in map(int, args.contexts.split(",")):
                sweep_layer(args.batch, context, best, res)
    else:
        res = sweep_attention([int(c) for c in args.contexts.split(",")], args.batch, args.heads, args.kv_heads, args.top)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
