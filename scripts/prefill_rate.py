"""Prefill alone against the device's own matmul rate (issue 12's target: >= 60% of the bf16
tensor-core rate a plain `torch.matmul` of the same sizes reaches, measured in the same process).

Times `LLM.generate` of N prompts x T random tokens with one new token each (no prefix cache, a
token budget holding all of them: one step), counts the step's FLOPs (every projection, the LM
head on the sampled rows, causal attention), and times `torch.matmul` on the projections' own
shapes at M = N x T, weighted by their FLOPs.

    python scripts/prefill_rate.py --model llama-3.1-8b --prompts 8 --tokens 2048 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from engine import LLM, SamplingParams
from engine.architectures import decode_projection_shapes


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` on the GPU (synchronised around each call)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    total = args.prompts * args.tokens
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", device="cuda", enable_prefix_caching=False,
              max_num_seqs=args.prompts, max_num_batched_tokens=total, max_model_len=args.tokens + 16)
    mc = llm.engine.model_config
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, mc.vocab_size, (args.tokens,), generator=gen).tolist() for _ in range(args.prompts)]
    once = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    prefill_s = timed(lambda: llm.generate(prompts, once), args.repeats)

    shapes = decode_projection_shapes(mc)  # (N, K, bias) per projection, the LM head last
    layer_flops = sum(2 * total * n * k for n, k, _ in shapes[:-1]) * mc.num_layers
    head_flops = 2 * args.prompts * shapes[-1][0] * shapes[-1][1]  # the sampled rows only
    attention_flops = 2 * 2 * mc.num_layers * mc.num_heads * mc.head_dim * args.prompts * args.tokens**2 / 2
    flops = layer_flops + head_flops + attention_flops
    ours = flops / prefill_s

    # The device's rate on the same GEMMs, FLOP-weighted (x [M, K] @ w [K, N], bf16).
    matmul_s = 0.0
    for n, k, _ in shapes[:-1]:
        x = torch.randn(total, k, dtype=torch.bfloat16, device="cuda")
        w = torch.randn(k, n, dtype=torch.bfloat16, device="cuda")
        matmul_s += timed(lambda x=x, w=w: torch.matmul(x, w), args.repeats) * mc.num_layers
        del x, w
    peak = layer_flops / matmul_s
    print(f"prefill {args.prompts} x {args.tokens} tokens: {prefill_s * 1e3:.1f} ms, {ours / 1e12:.0f} TFLOPS "
          f"({flops / 1e12:.1f} TFLOP: projections {layer_flops / 1e12:.1f}, attention {attention_flops / 1e12:.1f})")
    print(f"torch.matmul on the same projection shapes: {peak / 1e12:.0f} TFLOPS -> prefill at {ours / peak:.1%} of it")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "prompts": args.prompts, "tokens": args.tokens, "prefill_ms": prefill_s * 1e3,
                       "prefill_tflops": ours / 1e12, "matmul_tflops": peak / 1e12, "ratio": ours / peak}, f, indent=1)


if __name__ == "__main__":
    main()
