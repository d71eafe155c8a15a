"""`roseinfer bench`: the seed benchmark (offline or online), a batch-1 latency mode, optionally
side by side with HF generate.

Timing is end to end through the engine; with `--compare-hf` the same
workload runs through HF `transformers` `generate` (dynamic and static
cache) on the same weights, in the same process. On CUDA every run also
prints the memory floor of a decode step: the bytes it must read (weights
and K/V) over the device's copy rate measured in the same process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass

from engine.config import add_engine_args, engine_config_from_args

logger = logging.getLogger("roseinfer.bench")


@dataclass
class RunResult:
    total_s: float
    decode_s: float
    completion_tokens: int
    ttft_s: list[float]
    tpot_s: list[float]
    latency_s: list[float]
    # Device time of the pipelined greedy multi-step runs inside this run (0 when none ran).
    decode_run_gpu_s: float = 0.0
    # Time per step while every request decoded (steady_decode_step_s); None where not measured.
    steady_step_s: float | None = None

    @property
    def throughput_decode(self) -> float:
        # Tokens after each request's first one, over the time after the last first token.
        return (self.completion_tokens - len(self.ttft_s)) / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def throughput_total(self) -> float:
        return self.completion_tokens / self.total_s


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="the seed benchmark: throughput and latency, optionally against HF generate")
    add_engine_args(p)
    p.add_argument("--prompt", default="Hello")
    p.add_argument("--input-len", type=int, default=None,
                   help="prompts of this many token ids (fixed random ids) instead of --prompt")
    p.add_argument("--input-len-range", default=None, metavar="LO:HI",
                   help="random prompts whose part past the shared prefix is LO..HI tokens, uniformly")
    p.add_argument("--shared-prefix-len", type=int, default=0, help="random prompts share this many leading tokens")
    p.add_argument("--dataset", default=None, help="JSONL of prompts ('prompt' or chat 'messages' per line)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--guided-json", default=None,
                   help="constrain every request to this JSON schema (JSON text, or @file): the cost of constrained decoding")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sample at this temperature (default greedy; the bench's requests have no seed, so "
                        "they decode in pipelined runs on the sampling graphs)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--mode", choices=["offline", "online", "latency"], default="offline",
                   help="latency: the requests one after another, batch 1 (time to first token, time per token)")
    p.add_argument("--no-stop-on-eos", action="store_true", help="ignore EOS: every request makes max-new-tokens")
    p.add_argument("--pretok", action="store_true", help="tokenize before timing")
    p.add_argument("--warmup-runs", type=int, default=1)
    p.add_argument("--repeat-runs", type=int, default=3)
    p.add_argument("--paged-attn", action="store_true", help="same as --attention-backend triton (the default on CUDA)")
    p.add_argument("--compare-hf", action="store_true", help="also run HF generate (dynamic and static cache)")
    p.add_argument("--hf-runs", type=int, default=1, help="measured runs per HF variant")
    p.add_argument("--hf-variants", default="dynamic,static", help="HF KV caches to run: dynamic, static or both")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=cmd_bench)


def _p50_mean(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), statistics.fmean(values)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_offline(llm, prompts, params) -> RunResult:
    _sync(llm.engine.runner.device)
    start = time.monotonic()
    outs = llm.generate(prompts, params)
    end = time.monotonic()
    first = [o.first_token_time_s for o in outs]
    return _result(start, end, [len(o.token_ids) for o in outs], first, [o.finished_time_s for o in outs])


def run_latency(llm, prompts, params) -> RunResult:
    """Each prompt alone on an idle engine: batch-1 time to first token and time per output token."""
    outs = []
    start = time.monotonic()
    for prompt in prompts:
        (out,) = llm.generate([prompt], params)
        outs.append(out)
    end = time.monotonic()
    counts = [len(o.token_ids) for o in outs]
    result = _result(start, end, counts, [o.first_token_time_s for o in outs], [o.finished_time_s for o in outs])
    # Per request, from its own arrival: the runs are sequential, not concurrent.
    result.ttft_s = [o.first_token_time_s - o.arrival_time_s for o in outs]
    result.latency_s = [o.finished_time_s - o.arrival_time_s for o in outs]
    result.decode_s = sum(o.finished_time_s - o.first_token_time_s for o in outs)
    return result


def run_online(engine, prompts, params) -> RunResult:
    async def one(i: int, prompt):
        first = None
        n = 0
        stamps = []  # (when, tokens so far) at each output
        async for out in engine.generate(f"bench-{time.monotonic_ns()}-{i}", prompt, params):
            if first is None and out.new_token_ids:
                first = time.monotonic()
            n += len(out.new_token_ids)
            if out.new_token_ids:
                stamps.append((time.monotonic(), n))
        return n, first, time.monotonic(), stamps

    async def main():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    start = time.monotonic()
    results = asyncio.run(main())
    end = time.monotonic()
    first, finish = [r[1] for r in results], [r[2] for r in results]
    result = _result(start, end, [r[0] for r in results], first, finish)
    result.steady_step_s = steady_decode_step_s(first, finish, [r[3] for r in results])
    return result


def _result(start: float, end: float, counts: list[int], first: list[float], finish: list[float]) -> RunResult:
    last_first = max(first)
    tpot = [(f - t) / (n - 1) for n, t, f in zip(counts, first, finish) if n > 1]
    return RunResult(
        total_s=end - start, decode_s=end - last_first, completion_tokens=sum(counts),
        ttft_s=[t - start for t in first], tpot_s=tpot, latency_s=[f - start for f in finish],
    )


# Fewer tokens than this in the steady window: too few steps to time (multi-step runs hand tokens
# over 8 at a time by default).
STEADY_MIN_TOKENS = 32


def steady_decode_step_s(first: list[float], finish: list[float], stamps: list[list[tuple[float, int]]]) -> float | None:
    """Seconds per decode step while every request was decoding: from the last request's first
    token to the first request's end, no step carried a prompt's tokens and the batch was all of
    them. Per request, the time between its first and last output in that window over the tokens
    between them; the median over requests. TPOT does not give this where prompts are long: a
    request's TPOT spans the steps that prefilled the others' prompts too. None when the window
    holds fewer than STEADY_MIN_TOKENS tokens of a request (the requests did not all decode at once:
    more of them than the batch holds, or prefill overlapping most of the decoding)."""
    lo, hi = max(first), min(finish)
    per_request = []
    for outputs in stamps:
        inside = [(t, n) for t, n in outputs if lo <= t <= hi]
        if len(inside) < 2 or inside[-1][1] - inside[0][1] < STEADY_MIN_TOKENS:
            return None
        (t0, n0), (t1, n1) = inside[0], inside[-1]
        per_request.append((t1 - t0) / (n1 - n0))
    return statistics.median(per_request) if per_request else None


def summary_block(mode: str, warmup: int, runs: list[RunResult]) -> str:
    def line(label: str, values: list[float], unit: str, fmt: str = "{:.4f}") -> str:
        p50, mean = _p50_mean(values)
        return f"{label} p50/mean: {fmt.format(p50)} / {fmt.format(mean)} {unit}"

    return "\n".join([
        f"=== {mode} summary ===",
        f"Warmup runs: {warmup}",
        f"Measured runs: {len(runs)}",
        line("Decode time", [r.decode_s for r in runs], "s"),
        line("Total time", [r.total_s for r in runs], "s"),
        line("Throughput(completion,decode)", [r.throughput_decode for r in runs], "tokens/s", "{:.1f}"),
        line("Throughput(completion,total)", [r.throughput_total for r in runs], "tokens/s", "{:.1f}"),
        line("TTFT", [statistics.fmean(r.ttft_s) * 1e3 for r in runs], "ms", "{:.2f}"),
        line("TPOT", [statistics.fmean(r.tpot_s) * 1e3 for r in runs], "ms/token", "{:.4f}"),
        line("Latency", [statistics.fmean(r.latency_s) * 1e3 for r in runs], "ms", "{:.2f}"),
        "TTFT per request p50/p90/p99: " + " / ".join(
            f"{_percentile([t for r in runs for t in r.ttft_s], q) * 1e3:.2f}" for q in (50, 90, 99)) + " ms",
    ])


def _percentile(values: list[float], q: float) -> float:
    """The q-th percentile, nearest rank (no interpolation: a reported value was measured)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, -(-len(ordered) * q // 100) - 1))]


# ---- HF side ------------------------------------------------------------------------------
def hf_config_of(mc):
    """The HF config (and model class) of our architecture: GPT-2, Llama (with its RoPE scaling),
    or Qwen2 for biased q/k/v (HF's Llama would put a bias on o_proj too)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if mc.architecture == "gpt2":
        return GPT2Config(n_layer=mc.num_layers, n_embd=mc.hidden_size, n_head=mc.num_heads, vocab_size=mc.vocab_size,
                          n_positions=mc.max_position_embeddings, layer_norm_epsilon=mc.norm_eps), GPT2LMHeadModel
    common = dict(
        vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_layers, num_attention_heads=mc.num_heads, num_key_value_heads=mc.num_kv_heads,
        max_position_embeddings=mc.max_position_embeddings, rms_norm_eps=mc.norm_eps, rope_theta=mc.rope_theta,
        tie_word_embeddings=mc.tie_word_embeddings,
    )
    if mc.rope_scaling:
        common["rope_scaling"] = dict(mc.rope_scaling)
    if mc.attention_bias:
        if mc.head_dim != mc.hidden_size // mc.num_heads:
            raise ValueError("HF's Qwen2 derives head_dim from hidden_size / num_heads")
        return Qwen2Config(**common, use_sliding_window=False), Qwen2ForCausalLM
    return LlamaConfig(**common, head_dim=mc.head_dim, attention_bias=False), LlamaForCausalLM


def hf_model_from_ours(model, model_config, dtype, device):
    """An HF model computing with exactly our weights: its parameters are views of ours (no second
    copy of an 8B model), built directly in `dtype` on `device`; in another dtype than ours, copies
    converted to it (an fp32 reference of a bf16 model, say)."""
    import torch

    cfg, cls = hf_config_of(model_config)
    if model_config.architecture == "gpt2":
        from engine.models.gpt2 import to_hf_state_dict
    else:
        from engine.models.llama import to_hf_state_dict
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = cls(cfg).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    state = {name: t.to(dtype) for name, t in to_hf_state_dict(model).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if unexpected or any("rotary" not in m and "attn.bias" not in m for m in missing):
        raise RuntimeError(f"weight export mismatch: missing={missing} unexpected={unexpected}")
    if model_config.tie_word_embeddings:
        hf.tie_weights()
    return hf


def run_hf(hf, prompts: list[list[int]], batch_size: int, max_new_tokens: int, static: bool, device) -> RunResult:
    """HF generate over `prompts` in batches of `batch_size`, each left-padded to the longest prompt
    of the whole set (one shape, so a static cache compiles once). TTFT is the time of a separate
    one-token generate of the first batch, so the timed runs carry no per-token callback."""
    import torch

    width = max(len(p) for p in prompts)
    hf.generation_config.eos_token_id = None
    batches = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        batches.append((ids, mask))
    kwargs = dict(do_sample=False, pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"
    with torch.inference_mode():
        _sync(device)
        t0 = time.monotonic()
        hf.generate(batches[0][0], attention_mask=batches[0][1], max_new_tokens=1, **kwargs)
        _sync(device)
        ttft = time.monotonic() - t0
        start = time.monotonic()
        counts = []
        for ids, mask in batches:
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, **kwargs)
            counts += [out.shape[1] - width] * ids.shape[0]
        _sync(device)
        end = time.monotonic()
    return _result(start, end, counts, [start + ttft] * len(counts), [end] * len(counts))


def bench_prompts(args: argparse.Namespace, tokenizer, vocab_size: int) -> list[list[int]] | None:
    """Token-id prompts for the run, or None for --prompt as text: a JSONL file (`prompt` or chat
    `messages` per line, taken in order and repeated), or random ids from the vocabulary's middle
    (no special tokens at either end) with a shared prefix and a fixed or uniform length."""
    import random

    if args.dataset:
        rows = []
        with open(args.dataset, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    text = tokenizer.apply_chat_template(row["messages"]) if "messages" in row else row["prompt"]
                    rows.append(tokenizer.encode(text, add_special_tokens="messages" not in row))
        return [rows[i % len(rows)] for i in range(args.num_requests)]
    if args.input_len is None and args.input_len_range is None:
        return None
    rng = random.Random(args.seed)
    draw = lambda n: [rng.randrange(1000, vocab_size - 1000) for _ in range(n)]  # noqa: E731
    prefix = draw(args.shared_prefix_len)
    if args.input_len_range:
        lo, hi = (int(x) for x in args.input_len_range.split(":"))
        return [prefix + draw(rng.randint(lo, hi)) for _ in range(args.num_requests)]
    return [prefix + draw(args.input_len - args.shared_prefix_len) for _ in range(args.num_requests)]


def measure_copy_rate(device) -> float:
    """Device-to-device copy rate in bytes/s, counting the read and the write (the figure the
    memory floor divides by): median of 20 copies of 1 GiB."""
    import torch

    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(22):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * 2**30 / statistics.median(times[2:])


def floor_line(model_config, dtype, batch: int, context: int, copy_rate: float, step_s: float,
               ranks: int = 1, projection_bytes: int | None = None, kv_bytes: int | None = None) -> tuple[str, dict]:
    """The decode step against its memory floor: the bytes each GPU must read (a tensor-parallel
    rank reads its share; fp8 weights or cache a byte an element) over the copy rate. `context`:
    the K/V tokens a sequence's step reads from memory on average (a shared prefix counts once
    for the batch)."""
    from engine.architectures import decode_bytes_per_step

    nbytes = decode_bytes_per_step(model_config, dtype.itemsize, batch, context, projection_bytes, kv_bytes) // ranks
    floor_s = nbytes / copy_rate
    per_gpu = f" per GPU, {ranks} ranks" if ranks > 1 else ""
    line = (f"Decode step (batch {batch}, context read a sequence {context}): {step_s * 1e3:.3f} ms; memory floor "
            f"{floor_s * 1e3:.3f} ms "
            f"({nbytes / 1e9:.2f} GB read{per_gpu} / {copy_rate / 1e12:.2f} TB/s copy rate) -> {step_s / floor_s:.2f}x the floor")
    return line, {"batch": batch, "mean_context_read": context, "step_ms": step_s * 1e3, "floor_ms": floor_s * 1e3,
                  "bytes_per_step": nbytes, "copy_rate_tb_s": copy_rate / 1e12, "ratio_to_floor": step_s / floor_s}


def cmd_bench(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from engine.async_engine import AsyncEngine
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    config = engine_config_from_args(args)
    if args.compare_hf and config.tensor_parallel_size > 1:
        raise SystemExit("--compare-hf runs HF on our weights in this process: one rank only "
                         "(compare --tensor-parallel-size N against --tensor-parallel-size 1 instead)")
    if args.paged_attn:
        config = replace(config, attention_backend="triton")
    if args.mode == "latency":
        config = replace(config, max_num_seqs=1, cuda_graph_batch_sizes=(1,))
    load_start = time.monotonic()
    llm = LLM(config=config)
    logger.info("engine ready in %.1f s", time.monotonic() - load_start)
    runner = llm.engine.runner
    structured = None
    if args.guided_json is not None:
        from engine.sampling_params import StructuredOutputSpec

        text = args.guided_json
        if text.startswith("@"):
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        structured = StructuredOutputSpec.json_schema(text)
        llm.engine.structured.validate(structured)
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, ignore_eos=args.no_stop_on_eos, structured_output=structured)
    token_prompts = bench_prompts(args, llm.tokenizer, llm.engine.model_config.vocab_size)
    if token_prompts is not None:
        prompts = token_prompts
    else:
        prompt_ids = llm.tokenizer.encode(args.prompt)
        token_prompts = [prompt_ids] * args.num_requests
        prompts = [prompt_ids if args.pretok else args.prompt] * args.num_requests
    async_engine = AsyncEngine(engine=llm.engine) if args.mode == "online" else None

    def one_run() -> RunResult:
        gpu_before = llm.engine.decode_run_gpu_s
        if args.mode == "latency":
            result = run_latency(llm, prompts, params)
        elif async_engine is not None:
            result = run_online(async_engine, prompts, params)
        else:
            result = run_offline(llm, prompts, params)
        result.decode_run_gpu_s = llm.engine.decode_run_gpu_s - gpu_before
        return result

    for i in range(args.warmup_runs):
        logger.info("warmup run %d/%d", i + 1, args.warmup_runs)
        one_run()
    runs = []
    for i in range(args.repeat_runs):
        runs.append(one_run())
        logger.info("run %d/%d: %.1f tokens/s (decode)", i + 1, args.repeat_runs, runs[-1].throughput_decode)
    print(summary_block(args.mode, args.warmup_runs, runs), flush=True)
    if any(r.decode_run_gpu_s for r in runs):
        # Near 100%: the GPU bounds decoding; well below: the host (Python, asyncio) does.
        busy = statistics.median(r.decode_run_gpu_s / r.total_s for r in runs)
        print(f"GPU busy in multi-step decode runs p50: {busy:.1%} of total time", flush=True)

    report = {
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "device": str(runner.device) if runner.device.type == "cpu" else _device_name(runner.device),
        "dtype": str(runner.dtype), "attention": runner.attention.name,
        "cuda_graphs": bool(getattr(runner, "cuda_graphs_enabled", False)),
        "runs": [asdict(r) | {"throughput_decode": r.throughput_decode, "throughput_total": r.throughput_total} for r in runs],
    }
    ours = statistics.median(r.throughput_decode for r in runs)
    if runner.device.type == "cuda":
        batch = 1 if args.mode == "latency" else min(args.num_requests, config.max_num_seqs)
        # A step's time: while every request decoded (no prompt tokens in the steps), where the run
        # had such a window; else each request's time per output token (with more requests than
        # the batch holds, tokens over the last wave's decode window would overstate it).
        steady = [r.steady_step_s for r in runs]
        if args.mode == "latency":
            step_s, step_from = 1 / ours, "time per token"
        elif all(s is not None for s in steady):
            step_s, step_from = statistics.median(steady), "steps while every request decoded"
        else:
            step_s, step_from = statistics.median(t for r in runs for t in r.tpot_s), "TPOT (no window where all decoded)"
        context = round(statistics.fmean(len(p) for p in token_prompts)) + args.max_new_tokens // 2
        if config.enable_prefix_caching and args.shared_prefix_len:
            # The shared prefix's blocks are the same blocks for every sequence: read once a step.
            shared = min(args.shared_prefix_len, context)
            context = round(context - shared + shared / batch)
        line, report["floor"] = floor_line(runner.model_config, runner.dtype, batch, context,
                                           measure_copy_rate(runner.device), step_s, config.tensor_parallel_size,
                                           1 if runner.fp8_weights else None, runner.kv_dtype.itemsize)
        report["floor"]["step_from"] = step_from
        print(f"{line} [step time: {step_from}]", flush=True)
        if args.mode == "latency":
            ttft = statistics.median(t for r in runs for t in r.ttft_s)
            print(f"TTFT p50 {ttft * 1e3:.2f} ms = {ttft / step_s:.2f} decode steps", flush=True)
            report["floor"]["ttft_ms"] = ttft * 1e3
    if args.compare_hf:
        if async_engine is not None:
            asyncio.run(async_engine.shutdown())
            async_engine = None
        # Our KV cache fills most of the GPU; HF's dynamic cache reallocates every step and
        # crawls when memory is that tight, so give the memory back before HF runs.
        runner.free_device_memory()
        hf = hf_model_from_ours(runner.model, runner.model_config, runner.dtype, runner.device)
        rows = [("roseinfer", ours, statistics.median(r.throughput_total for r in runs))]
        report["hf"] = {}
        variants = [v.strip() for v in args.hf_variants.split(",")]
        for label, static in [(f"hf-{v}", v == "static") for v in variants]:
            try:
                # Warm-up; the static cache is sized by prompt + max_new_tokens and compiled for that
                # shape, so its warm-up must use the full length or the timed run recompiles.
                warm_tokens = args.max_new_tokens if static else min(args.max_new_tokens, 16)
                # Batches as large as ours (at most --max-batch-size); latency mode: one prompt at a time.
                hf_batch = 1 if args.mode == "latency" else min(args.num_requests, config.max_num_seqs)
                run_hf(hf, token_prompts, hf_batch, warm_tokens, static, runner.device)
                hf_runs = [run_hf(hf, token_prompts, hf_batch, args.max_new_tokens, static, runner.device)
                           for _ in range(args.hf_runs)]
            except Exception as exc:  # report, do not lose our own numbers
                logger.exception("HF %s failed", label)
                report["hf"][label] = {"error": str(exc)}
                continue
            dec = statistics.median(r.throughput_decode for r in hf_runs)
            tot = statistics.median(r.throughput_total for r in hf_runs)
            rows.append((label, dec, tot))
            report["hf"][label] = [asdict(r) | {"throughput_decode": r.throughput_decode} for r in hf_runs]
        print("\n=== compare (same process, same weights) ===")
        # decode: tokens over the window after the last first token (one wave's decode speed);
        # total: output tokens over the whole run, prefill included (what real traffic sees).
        ours_total = rows[0][2]
        print(f"{'impl':<12} {'decode tok/s':>14} {'total tok/s':>13} {'ours/impl (decode)':>20} {'ours/impl (total)':>19}")
        for label, dec, tot in rows:
            print(f"{label:<12} {dec:>14.1f} {tot:>13.1f} {ours / dec:>19.2f}x {ours_total / tot:>18.2f}x")
        report["compare"] = [{"impl": lbl, "decode_tokens_per_s": d, "total_tokens_per_s": t, "ratio_ours_over": ours / d,
                              "ratio_total_ours_over": ours_total / t} for lbl, d, t in rows]
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=1)
    if async_engine is not None:
        asyncio.run(async_engine.shutdown())
    llm.close()
    return 0


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device)
