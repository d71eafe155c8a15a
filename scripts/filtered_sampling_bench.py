"""What a sampled decode step's filters cost on the GPU: engine.sampler.sample_rows as the sampling
graphs run it (top-k as a tensor, top-p 0.95, temperature 0.8) with its sort, against the same draw
by roseinfer_kernels.filtered_sampling (an exponential race with rejection per row, no sort), in CUDA graphs;
and whether the two draw the same tokens; then the same for temperature alone (torch's softmax
and division against the kernel's race). Logits are random (scaled by --scale: larger is more
peaked, as a trained model's are). (The CUDA decoder makes the same measurement at capture:
engine.sampler.sampling_kernels.)

    python scripts/filtered_sampling_bench.py                # GPT-2's vocabulary and Llama 3's, batch 64 and 256
    python scripts/filtered_sampling_bench.py --top-k 50     # both filters: the kernel also searches for the k-th logit
"""

from __future__ import annotations

import argparse

import torch

from engine.sampler import sample_rows
from roseinfer_kernels.filtered_sampling import filtered_sample
from roseinfer_kernels.tune import graph_us_per_call


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="64x50257,256x50257,64x128256,256x128256", help="ROWSxVOCAB,...")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="0: none (the vocabulary), as most requests")
    p.add_argument("--scale", default="4,12", help="logit scales to try (random normal logits times this)")
    args = p.parse_args()
    for shape in args.shapes.split(","):
        rows, vocab = map(int, shape.split("x"))
        for scale in map(float, args.scale.split(",")):
            gen = torch.Generator(device="cuda").manual_seed(rows + vocab)
            logits = torch.randn(rows, vocab, device="cuda", generator=gen) * scale
            greedy = torch.zeros(rows, dtype=torch.bool, device="cuda")
            temperature = torch.full((rows,), 0.8, device="cuda")
            top_k = torch.full((rows,), args.top_k if 0 < args.top_k < vocab else vocab, dtype=torch.int64, device="cuda")
            top_p = torch.full((rows,), args.top_p, device="cuda")
            min_p = torch.zeros(rows, device="cuda")
            noise = torch.empty_like(logits).exponential_(generator=gen)
            draws = [lambda k=k: sample_rows(logits, greedy, temperature, top_k, top_p, min_p, noise, k)
                     for k in (None, filtered_sample)]
            sort_us, kernel_us = (graph_us_per_call([draw]) for draw in draws)
            alone_us = graph_us_per_call([lambda: filtered_sample(logits, noise, top_k, top_p, min_p)])
            a, b = (draw() for draw in draws)
            plain = [lambda k=k: sample_rows(logits, greedy, temperature, None, None, None, noise, k)
                     for k in (None, filtered_sample)]
            softmax_us, race_us = (graph_us_per_call([draw]) for draw in plain)
            c, d = (draw() for draw in plain)
            print(f"{rows} x {vocab}, logits x{scale:g}: sample_rows (sort) {sort_us:.1f} us, with the sampling kernel "
                  f"{kernel_us:.1f} us ({kernel_us / sort_us:.2f}x; the kernel alone {alone_us:.1f} us); same tokens in "
                  f"{(a == b).float().mean().item():.1%} of rows; temperature alone {softmax_us:.1f} us against "
                  f"{race_us:.1f} us ({race_us / softmax_us:.2f}x, same tokens in {(c == d).float().mean().item():.1%})",
                  flush=True)


if __name__ == "__main__":
    main()
