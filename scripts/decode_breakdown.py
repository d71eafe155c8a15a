"""Where a decode step's GPU time goes, measured by taking parts out: the step's CUDA graph is
recaptured with one part skipped (norms, RoPE, KV write + attention, SiLU-mul, LM head, or all of
them: projections only) and each variant's replay time is compared with the whole step's.

Kernel profiles cannot say this under programmatic dependent launch, where kernels overlap and a
kernel's time includes waiting for the one before it; a part's cost here is what the step saves
without it. The memory floor of the step is printed beside it.

    python scripts/decode_breakdown.py --model llama-3.1-8b --batches 1,64 --context 256 --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch

from engine import LLM, SamplingParams
from engine.architectures import decode_bytes_per_step
from engine.bench import measure_copy_rate
from engine.models.layers import AddNorm
from roseinfer_kernels.tune import graph_us_per_call

PARTS = ("norms", "rope", "attention", "act", "lm_head")


_CLASS_ATTR = object()  # marks an attribute the instance did not hold itself (a method)


def skip(model, attention, part: str) -> list[tuple[object, str, object]]:
    """Replace `part` with a no-op of the same shape; returns what to restore."""
    touched = []

    def patch(obj, attr, value):
        touched.append((obj, attr, obj.__dict__.get(attr, _CLASS_ATTR)))
        setattr(obj, attr, value)

    for module in model.modules():
        if part == "norms" and isinstance(module, AddNorm):
            patch(module, "forward", lambda x, residual=None: (x, x))
        elif part == "act" and getattr(module, "act_kernel", None) is not None:
            patch(module, "act_kernel", lambda gate_up, pdl=False, n=module.intermediate_size: gate_up[:, :n])
    if part == "rope":  # the plain cache write instead of RoPE fused with it
        forward = attention.forward
        patch(attention, "forward", lambda q, k, v, cache, meta, scale, rope=None, kv_scales=(1.0, 1.0):
              forward(q, k, v, cache, meta, scale, kv_scales=kv_scales))
    if part == "attention":
        patch(attention, "forward", lambda q, k, v, cache, meta, scale, rope=None, kv_scales=(1.0, 1.0): q)
    if part == "lm_head":
        patch(model, "compute_logits", lambda hidden, upcast=True: hidden)
    return touched


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    llm = LLM(args.model, load_format="dummy", device="cuda", enable_prefix_caching=False, max_num_seqs=max(batches),
              cuda_graph_batch_sizes=tuple(batches), num_scheduler_steps=1)
    engine, runner = llm.engine, llm.engine.runner
    model, graphs = runner.model, runner.graphs
    copy_rate = measure_copy_rate(runner.device)
    results = {"model": args.model, "device": torch.cuda.get_device_name(0), "copy_rate_tb_s": copy_rate / 1e12}
    vocab = engine.model_config.vocab_size
    for batch in batches:
        params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"b{batch}-{i}", [(i * 7 + j) % (vocab - 1) + 1 for j in range(args.context)], params)
        while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
            engine.step()
        seqs = list(engine.scheduler.running)
        for seq in seqs:  # a block for the token the step writes
            engine.block_manager.allocate(seq, seq.num_tokens)
        graphs.run_decode(seqs)  # fills the graph's static inputs for this batch
        meta = graphs._meta(batch)

        def step():
            model.compute_logits(model(graphs.input_ids[:batch], graphs.positions[:batch], runner.kv_caches, meta))

        row = {}
        with torch.inference_mode():
            row["whole step"] = graph_us_per_call([step])
            for part in (*PARTS, "all but projections"):
                touched = [t for q in (PARTS if part == "all but projections" else (part,))
                           for t in skip(model, runner.attention, q)]
                row[f"without {part}"] = graph_us_per_call([step])
                for obj, attr, old in reversed(touched):
                    if old is _CLASS_ATTR:
                        delattr(obj, attr)  # back to the class's method
                    else:
                        setattr(obj, attr, old)
        floor_us = decode_bytes_per_step(engine.model_config, runner.dtype.itemsize, batch, args.context,
                                         1 if runner.fp8_weights else None, runner.kv_dtype.itemsize) / copy_rate * 1e6
        whole = row["whole step"]
        print(f"{args.model} batch {batch} context {args.context}: whole step {whole:.1f} us, floor {floor_us:.1f} us "
              f"({whole / floor_us:.2f}x)", flush=True)
        for name, us in row.items():
            if name != "whole step":
                print(f"  {name:<28} {us:8.1f} us  (part costs {whole - us:7.1f} us, {(whole - us) / whole:6.1%})", flush=True)
        results[f"batch{batch}"] = {"floor_us": floor_us, **row}
        for seq in seqs:
            engine.abort_request(seq.request_id)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
