"""How long a model takes to be ready, and how fast a real checkpoint's weights stream in.

1. `LLM(model, load_format="dummy")` to ready (weights, KV cache, CUDA graphs, warm-up), then the
   first free request and the first constrained one after it (neither should meet a cold path: a
   compile, an allocation, a grammar worker still starting).
2. Its weights written as an HF safetensors directory (shards of about 5 GB), read once so they
   sit in the page cache, then loaded by the engine's loader alone: GB/s from the page cache;
   then `LLM(directory)` to ready.

    python scripts/load_speed.py --model llama-3.1-8b --dir /tmp/ckpt --json out.json
    TRITON_CACHE_DIR=/tmp/fresh python scripts/load_speed.py --ready-only [--no-cascade-attention]   # step 1 alone
    TRITON_CACHE_DIR=/tmp/fresh python scripts/load_speed.py --ready-only --compile-times   # which kernels compile, how long

The first process on a machine compiles every Triton kernel (a cold cache): run step 1 twice with a
fresh TRITON_CACHE_DIR to see cold and warm ready times apart.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import time

import torch

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.sampling_params import StructuredOutputSpec


def write_checkpoint(llm: LLM, path: str, shard_bytes: int = 5 * 10**9) -> int:
    from safetensors.torch import save_file

    from engine.bench import hf_config_of
    from engine.models.llama import to_hf_state_dict
    from engine.tokenizer import standin_tokenizer

    runner = llm.engine.runner
    mc = runner.model_config
    os.makedirs(path, exist_ok=True)
    state = to_hf_state_dict(runner.model)
    if mc.tie_word_embeddings:
        state.pop("lm_head.weight")
    shards, shard, size = [], {}, 0
    for name in sorted(state):
        shard[name] = state[name].contiguous().cpu()
        size += shard[name].numel() * shard[name].element_size()
        if size >= shard_bytes:
            shards.append(shard)
            shard, size = {}, 0
    shards.append(shard)
    for i, part in enumerate(shards):
        save_file(part, os.path.join(path, f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"))
    cfg, _ = hf_config_of(mc)
    cfg.architectures = ["Qwen2ForCausalLM" if mc.attention_bias else "LlamaForCausalLM"]
    cfg.torch_dtype = str(runner.dtype).removeprefix("torch.")
    cfg.save_pretrained(path)
    standin_tokenizer(mc.vocab_size, mc.eos_token_ids, mc.bos_token_id).tokenizer.save(os.path.join(path, "tokenizer.json"))
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def first_requests_ms(llm: LLM) -> dict[str, float]:
    """Wall milliseconds of the first free request after ready and then of the first constrained
    one (8 greedy tokens each from a 4-token prompt; the constrained one held to a small schema),
    after the engine's own grammar compiler is built, as the server builds it before serving
    (`prepare`, also timed: an offline LLM builds it on its first constrained request)."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    t = time.perf_counter()
    llm.engine.structured.prepare()
    out = {"grammar compiler (prepare)": (time.perf_counter() - t) * 1e3}
    for name, spec in (("free", None), ("constrained", StructuredOutputSpec.json_schema(schema))):
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=spec is None, structured_output=spec)
        t = time.perf_counter()
        llm.generate([[5, 6, 7, 8]], params)
        out[name] = (time.perf_counter() - t) * 1e3
    return out


def time_triton_compiles() -> dict[str, list[float]]:
    """Seconds of each Triton compile (a cache hit loads from disk: milliseconds), per kernel name,
    from here on. Kernels bind `triton.compiler.compile` when first launched, so call this first."""
    import triton.compiler

    times: dict[str, list[float]] = {}
    compile_kernel = triton.compiler.compile

    def timed(src, *args, **kwargs):
        start = time.perf_counter()
        try:
            return compile_kernel(src, *args, **kwargs)
        finally:
            name = getattr(getattr(src, "fn", None), "__name__", None) or str(getattr(src, "name", src))[:60]
            times.setdefault(name, []).append(time.perf_counter() - start)

    triton.compiler.compile = timed
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--dir", default="/tmp/roseinfer-ckpt")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--json", default=None)
    p.add_argument("--ready-only", action="store_true", help="only step 1 (the dummy model's ready time)")
    p.add_argument("--no-cascade-attention", dest="cascade_attention", action="store_false",
                   help="without the cascade decode graphs (what capturing them costs)")
    p.add_argument("--compile-times", action="store_true", help="print each Triton kernel's compiles (count, seconds)")
    args = p.parse_args()
    compiles = time_triton_compiles() if args.compile_times else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    report = {"model": args.model, "device": torch.cuda.get_device_name(0)}

    t = time.monotonic()
    llm = LLM(args.model, load_format="dummy", device="cuda", max_num_seqs=args.max_num_seqs,
              cascade_attention=args.cascade_attention)
    report["dummy_ready_s"] = time.monotonic() - t
    print(f"LLM({args.model!r}, load_format='dummy', cascade_attention={args.cascade_attention}) ready in "
          f"{report['dummy_ready_s']:.1f} s", flush=True)
    report["first_requests_ms"] = first = first_requests_ms(llm)
    print("first requests after ready: " + ", ".join(f"{k} {v:.0f} ms" for k, v in first.items()), flush=True)
    if compiles is not None:
        report["compiles"] = {name: sum(t) for name, t in compiles.items()}
        print(f"Triton compiles: {sum(map(len, compiles.values()))}, {sum(report['compiles'].values()):.1f} s", flush=True)
        for name, seconds in sorted(compiles.items(), key=lambda kv: -sum(kv[1])):
            print(f"  {name:40} {len(seconds):4d} x, {sum(seconds):6.2f} s (longest {max(seconds):.2f})", flush=True)
    if args.ready_only:
        return

    t = time.monotonic()
    nbytes = write_checkpoint(llm, args.dir)
    report["write_s"], report["checkpoint_bytes"] = time.monotonic() - t, nbytes
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    for f in os.listdir(args.dir):  # into the page cache
        with open(os.path.join(args.dir, f), "rb") as fh:
            while fh.read(1 << 26):
                pass

    from engine.loader import load_model
    from engine.model_runner import make_attention_backend

    device = torch.device("cuda")
    t = time.monotonic()
    loaded = load_model(EngineConfig(model=args.dir, device="cuda"), device, make_attention_backend("triton", device))
    torch.cuda.synchronize()
    load_s = time.monotonic() - t
    report["weights_load_s"] = load_s
    report["weights_gb_s"] = nbytes / load_s / 1e9
    print(f"weights of {args.dir} ({nbytes / 1e9:.2f} GB, page cache): {load_s:.2f} s = {nbytes / load_s / 1e9:.2f} GB/s",
          flush=True)
    del loaded
    gc.collect()
    torch.cuda.empty_cache()
    t = time.monotonic()
    LLM(args.dir, device="cuda", max_num_seqs=args.max_num_seqs)
    report["dir_ready_s"] = time.monotonic() - t
    print(f"LLM({args.dir!r}) ready in {report['dir_ready_s']:.1f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
