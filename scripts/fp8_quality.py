"""How much FP8 weights (`--quantization fp8`) and an FP8 KV cache (`--kv-cache-dtype fp8`) change a
model's outputs, against the same model in bf16 and fp32: next-token logits' cosine similarity at
every position of a set of prompts, greedy agreement, and the perplexity of a fixed text. With an
fp8 cache the text is fed in chunks, so that every position attends to K/V read back from the cache
(a one-shot prefill attends to the fresh ones). On the CPU the FP8 GEMMs run in torch's reference
`_scaled_mm` (the same arithmetic cuBLASLt does on Hopper: e4m3 inputs, fp32 accumulation).

    python scripts/fp8_quality.py --model smollm2-135m-instruct --json out.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,",
    "The three primary colors are", "To make a cup of tea, first", "In 1969, the first humans",
    "import numpy as np\nx = np.", "The best way to learn a new language is", "Water boils at",
    "Q: What is the largest planet in the solar system?\nA:", "Dear hiring manager,", "The theory of relativity",
]

# A fixed paragraph (written for this script) whose perplexity each variant is scored on.
TEXT = (
    "The lighthouse stood at the end of a narrow spit of rock, and for most of the year the only visitors "
    "were gulls and the occasional fisherman sheltering from a squall. Its keeper kept a careful log: the "
    "direction of the wind at dawn, the height of the tide, the ships that passed and the hour they passed. "
    "He wound the clockwork that turned the great lens every four hours, trimmed the wick, and polished the "
    "brass until it shone. In winter the storms came in from the west, and the waves climbed the tower until "
    "spray struck the glass of the lantern room itself. On those nights he did not sleep at all. He sat by "
    "the light with a pot of coffee and listened to the sea, and when the weather cleared he walked the "
    "shore to see what the water had brought. Usually it was driftwood, sometimes a float from a net, once "
    "a wooden crate of oranges that he shared with the family who delivered his supplies each month."
)


def all_logits(llm: LLM, ids: list[int], chunk: int | None = None) -> torch.Tensor:
    """Logits at every position of one sequence, [len(ids), vocab] fp32: prefill steps of `chunk`
    tokens (None: one step; else a first step of one token, so that every later one reads its
    context back from the cache) into the first blocks of the runner's cache; nothing else may be
    running."""
    runner = llm.engine.runner
    dev = runner.device
    n = len(ids)
    bounds = [0, n] if chunk is None else [0, *range(1, n, chunk), n]
    out = []
    with torch.inference_mode():
        for start, end in zip(bounds, bounds[1:]):
            hidden = runner.model(torch.tensor(ids[start:end], device=dev), torch.arange(start, end, device=dev),
                                  runner.kv_caches, runner.one_sequence_meta(start, end))
            out.append(runner.model.compute_logits(hidden).float().cpu())
    return torch.cat(out)


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    nll = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    return math.exp(nll.item())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="cpu")
    p.add_argument("--load-format", default="auto", help="dummy: random weights (the named architectures)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    variants = {
        "fp32": dict(dtype="float32", quantization="none"),
        "bf16": dict(dtype="bfloat16", quantization="none"),
        "fp8": dict(dtype="bfloat16", quantization="fp8"),  # as on a GPU: FP8 GEMMs, bf16 elsewhere
        "kv_fp8": dict(dtype="bfloat16", quantization="none", kv_cache_dtype="fp8", attention_backend="torch"),
        "fp8+kv_fp8": dict(dtype="bfloat16", quantization="fp8", kv_cache_dtype="fp8", attention_backend="torch"),
    }
    greedy = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    logits, tokens, ppl = {}, {}, {}
    for name, kwargs in variants.items():
        if args.device != "cpu":
            kwargs = {k: v for k, v in kwargs.items() if k != "attention_backend"}  # the Triton kernels there
        llm = LLM(args.model, device=args.device, load_format=args.load_format, num_kv_blocks=128, **kwargs)
        prompt_ids = [llm.tokenizer.encode(t) for t in PROMPTS]
        text_ids = llm.tokenizer.encode(TEXT)
        chunk = 8 if kwargs.get("kv_cache_dtype") == "fp8" else None
        logits[name] = [all_logits(llm, ids, chunk) for ids in prompt_ids]
        ppl[name] = perplexity(all_logits(llm, text_ids, chunk), text_ids)
        tokens[name] = [o.token_ids for o in llm.generate(prompt_ids, greedy)]
        del llm

    def cosine(a: str, b: str) -> float:
        sims = [F.cosine_similarity(x, y, dim=-1).mean().item() for x, y in zip(logits[a], logits[b])]
        return sum(sims) / len(sims)

    def agreement(a: str, b: str) -> tuple[float, float]:
        """(next-token top-1 agreement over every prompt position, mean greedy tokens before the
        first difference)."""
        top1 = torch.cat([(x.argmax(-1) == y.argmax(-1)).float() for x, y in zip(logits[a], logits[b])]).mean().item()
        runs = []
        for s, t in zip(tokens[a], tokens[b]):
            same = next((i for i, (u, v) in enumerate(zip(s, t)) if u != v), len(s))
            runs.append(same)
        return top1, sum(runs) / len(runs)

    report = {"model": args.model, "perplexity": ppl, "pairs": {}}
    print("perplexity of the fixed text: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    for a, b in (("fp8", "bf16"), ("kv_fp8", "bf16"), ("fp8+kv_fp8", "bf16"), ("fp8", "fp32"), ("bf16", "fp32")):
        cos = cosine(a, b)
        top1, run = agreement(a, b)
        report["pairs"][f"{a}_vs_{b}"] = {"logits_cosine": cos, "top1_agreement": top1, "greedy_tokens_before_diff": run}
        print(f"{a} vs {b}: logits cosine {cos:.5f}, top-1 agreement {top1:.3f}, "
              f"greedy tokens before the first difference {run:.1f} of {args.new_tokens}")
    for name in ("fp8", "kv_fp8", "fp8+kv_fp8"):
        print(f"{name} perplexity / bf16: {ppl[name] / ppl['bf16']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
