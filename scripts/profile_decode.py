"""Where a decode step's time goes: graph replay (GPU), engine step (wall), host profile, top kernels;
then what the captured sampling step of a sampled run costs on the device, and its kernels.

    python scripts/profile_decode.py --model gpt2 --batch 64 --context 256
"""

import argparse
import cProfile
import pstats
import time

import torch

from engine import LLM, SamplingParams
from roseinfer_kernels.tune import replay_ms


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gpt2")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--hf", action="store_true", help="also time HF generate (dynamic cache)")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="also time and profile the captured sampling step at temperature 0.8 with this top-p")
    args = p.parse_args()
    llm = LLM(args.model, load_format="dummy", device="cuda", tokenizer=args.tokenizer, enable_prefix_caching=False,
              num_scheduler_steps=args.steps, max_num_seqs=args.batch)
    engine = llm.engine
    params = SamplingParams(max_tokens=engine.max_model_len - args.context - 1, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"p{i}", [(i * 7 + j) % 50000 for j in range(args.context)], params)
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
        engine.step()
    graphs = engine.runner.graphs
    seqs = list(engine.scheduler.running)
    bs = next(b for b in graphs.batch_sizes if b >= len(seqs))
    # Stage this batch in the decode graph's static inputs first (run_decode does, and replays once):
    # replays on whatever the last step left there would time the wrong context lengths.
    for seq in seqs:
        engine.block_manager.allocate(seq, seq.num_tokens)
    graphs.run_decode(seqs)
    torch.cuda.synchronize()
    print(f"batch {len(seqs)} context ~{args.context}: graph replay {replay_ms(graphs.graphs[bs], 50):.3f} ms/step (GPU)",
          flush=True)
    if graphs.multi_graphs:
        print(f"multi-step graph ({graphs.multi_steps} steps): "
              f"{replay_ms(graphs.multi_graphs[bs], 10) / graphs.multi_steps:.3f} ms/step (GPU)")
    # One greedy multi-step run through the engine's own launch path: host time to launch, device time.
    for seq in seqs:
        engine.block_manager.allocate(seq, seq.num_tokens + graphs.multi_steps)
    torch.cuda.synchronize()
    t = time.perf_counter()
    pending = graphs.launch_greedy_steps(seqs, chained=False)
    launch = time.perf_counter() - t
    pending.wait()
    wall = time.perf_counter() - t
    print(f"one {graphs.multi_steps}-step run: launch (host) {launch * 1e3:.3f} ms, device {pending.gpu_s * 1e3:.3f} ms, "
          f"launch to tokens on the host {wall * 1e3:.3f} ms")
    # Host time of the launches inside engine steps (greedy runs go through launch_pipelined_run).
    runner = engine.runner
    launch_s = 0.0
    original = runner.launch_pipelined_run

    def timed(*a, **k):
        nonlocal launch_s
        t = time.perf_counter()
        r = original(*a, **k)
        launch_s += time.perf_counter() - t
        return r

    runner.launch_pipelined_run = timed
    t0 = time.perf_counter()
    for _ in range(5):
        engine.step()
    total = time.perf_counter() - t0
    runner.launch_pipelined_run = original
    print(f"5 engine steps: {total*1e3:.1f} ms wall, of which launch_pipelined_run (host) {launch_s*1e3:.1f} ms")

    def run_steps(n: int) -> int:
        tokens = 0
        for _ in range(n):
            tokens += sum(len(o.new_token_ids) for o in engine.step())
        return tokens

    run_steps(2)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = run_steps(10)
    wall = time.perf_counter() - t0
    print(f"engine: {wall / (tokens / len(seqs)) * 1e3:.3f} ms per token step (wall, {args.steps}-step decode)", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    run_steps(10)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)

    if args.hf:
        from engine.bench import hf_model_from_ours, run_hf

        hf = hf_model_from_ours(engine.runner)
        run_hf(hf, [15496], 64, 8, False, engine.runner.device)
        r = run_hf(hf, [15496], 64, 64, False, engine.runner.device)
        print(f"HF dynamic, 64 x 64 tokens: {r.total_s*1e3:.1f} ms total, {r.throughput_total:.0f} tokens/s")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as tprof:
        for _ in range(5):
            graphs.graphs[bs].replay()
        torch.cuda.synchronize()
    print(tprof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=70))
    if graphs.sample_graphs:
        # A sampled run's last-step sampling graph (engine.sampler.sample_rows on the step's
        # logits; it leaves the device-side step index alone, so it replays any number of times),
        # on its own: what sampling adds to a step on the device.
        variant = graphs.set_row_params([SamplingParams(temperature=0.8, top_p=args.top_p)] * len(seqs))
        sample_step = graphs.sample_graphs[(bs, variant)][1]
        sample_step.replay()
        torch.cuda.synchronize()
        print(f"sampling graph (temperature 0.8, top-p {args.top_p}, sampling variant {variant}): "
              f"{replay_ms(sample_step, 20) * 1e3:.1f} us/step (GPU)")
        with profile(activities=[ProfilerActivity.CUDA]) as sprof:
            for _ in range(5):
                sample_step.replay()
            torch.cuda.synchronize()
        print(sprof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))


if __name__ == "__main__":
    main()
