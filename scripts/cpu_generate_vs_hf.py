"""Single-prompt decode speed on the CPU: roseinfer's engine next to HF `generate`, same weights
(the real SmolLM2 GGUF, fp32), same prompt, greedy, EOS ignored; best of a few runs each.

    python scripts/cpu_generate_vs_hf.py --max-tokens 64 --runs 3
"""

import argparse
import os
import time

import torch

from engine import LLM, SamplingParams
from engine.loader import smollm2_gguf_path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    llm = LLM("smollm2-135m-instruct", dtype="float32")
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    ours = []
    for _ in range(args.runs):
        start = time.perf_counter()
        (out,) = llm.generate([prompt], params)
        ours.append(len(out.token_ids) / (time.perf_counter() - start))
    gguf = smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    ids = torch.tensor([out.prompt_token_ids])
    theirs = []
    with torch.inference_mode():
        for _ in range(args.runs):
            start = time.perf_counter()
            gen = hf.generate(ids, max_new_tokens=args.max_tokens, do_sample=False, pad_token_id=0)
            theirs.append((gen.shape[1] - ids.shape[1]) / (time.perf_counter() - start))
        same = gen[0, ids.shape[1]:].tolist() == out.token_ids
    print(f"torch threads {torch.get_num_threads()}, prompt {ids.shape[1]} tokens, {args.max_tokens} new tokens, fp32")
    print(f"roseinfer: best {max(ours):.1f} tokens/s (runs {', '.join(f'{x:.1f}' for x in ours)})")
    print(f"HF generate: best {max(theirs):.1f} tokens/s (runs {', '.join(f'{x:.1f}' for x in theirs)})")
    print(f"ratio {max(ours) / max(theirs):.2f}x; same tokens: {same}")


if __name__ == "__main__":
    main()
