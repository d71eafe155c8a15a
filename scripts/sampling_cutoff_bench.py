"""What a sampled decode step's filters cost on the GPU: engine.sampler.sample_rows as the sampling
graphs run it (top-k as a tensor, top-p 0.95, temperature 0.8) against the same draw with the cut
from kernels.sampling_cutoff (a radix search per row, no sort), in CUDA graphs; and whether the two
keep the same tokens. (The CUDA decoder makes the same measurement at capture: engine.sampler.filter_cutoff.)

    python scripts/sampling_cutoff_bench.py                  # GPT-2's vocabulary and Llama 3's, batch 64 and 256
"""

from __future__ import annotations

import argparse

import torch

from engine.sampler import sample_rows
from kernels.sampling_cutoff import topk_topp_cutoff
from kernels.tune import graph_us_per_call


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="64x50257,256x50257,64x128256,256x128256", help="ROWSxVOCAB,...")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="0: none (the vocabulary), as most requests")
    args = p.parse_args()
    for shape in args.shapes.split(","):
        rows, vocab = map(int, shape.split("x"))
        gen = torch.Generator(device="cuda").manual_seed(rows + vocab)
        logits = torch.randn(rows, vocab, device="cuda", generator=gen) * 4
        greedy = torch.zeros(rows, dtype=torch.bool, device="cuda")
        temperature = torch.full((rows,), 0.8, device="cuda")
        top_k = torch.full((rows,), args.top_k if 0 < args.top_k < vocab else vocab, dtype=torch.int64, device="cuda")
        top_p = torch.full((rows,), args.top_p, device="cuda")
        min_p = torch.zeros(rows, device="cuda")
        noise = torch.empty_like(logits).exponential_(generator=gen)
        sort_us = graph_us_per_call([lambda: sample_rows(logits, greedy, temperature, top_k, top_p, min_p, noise)])
        cut_us = graph_us_per_call([lambda: sample_rows(logits, greedy, temperature, top_k, top_p, min_p, noise,
                                                        topk_topp_cutoff)])
        kernel_us = graph_us_per_call([lambda: topk_topp_cutoff(logits, top_k, top_p)])
        a = sample_rows(logits, greedy, temperature, top_k, top_p, min_p, noise)
        b = sample_rows(logits, greedy, temperature, top_k, top_p, min_p, noise, topk_topp_cutoff)
        print(f"{rows} x {vocab}: sample_rows (sort) {sort_us:.1f} us, with the cutoff kernel {cut_us:.1f} us "
              f"({cut_us / sort_us:.2f}x; the kernel alone {kernel_us:.1f} us); same tokens in "
              f"{(a == b).float().mean().item():.1%} of rows", flush=True)


if __name__ == "__main__":
    main()
