"""Where an idle engine's time to first token goes: each request's first engine step timed by part
(scheduling, the model step, sampling and bookkeeping), then the Python profile of those steps.

    python scripts/first_token.py --model llama-3.1-8b --input-len 1 --requests 5
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time

import torch

from engine import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--input-len", type=int, default=1)
    p.add_argument("--requests", type=int, default=5)
    args = p.parse_args()
    llm = LLM(args.model, load_format="dummy", device="cuda", max_num_seqs=1, cuda_graph_batch_sizes=(1,),
              enable_prefix_caching=False)
    engine = llm.engine
    rng = random.Random(0)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    profile = cProfile.Profile()
    for i in range(args.requests):
        prompt = [rng.randrange(1000, engine.model_config.vocab_size - 1000) for _ in range(args.input_len)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        seq = engine.add_request(f"r{i}", prompt, params)
        t1 = time.perf_counter()
        profile.enable()
        outs = engine.step()
        profile.disable()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        got = [o for o in outs if o.request_id == seq.request_id and o.new_token_ids]
        print(f"request {i}: add_request {(t1 - t0) * 1e3:.2f} ms, first step {(t2 - t1) * 1e3:.2f} ms "
              f"({len(got)} output with a token; ttft from arrival {(seq.first_token_time_s - seq.arrival_time_s) * 1e3:.2f} ms)",
              flush=True)
        t3 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        print(f"  second step {(time.perf_counter() - t3) * 1e3:.2f} ms", flush=True)
        while engine.has_unfinished():
            engine.step()
    pstats.Stats(profile).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
