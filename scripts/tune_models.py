"""Tune the launch table for named architectures on this GPU: every decode projection (and the LM
head) against cuBLAS at each batch bucket, and optionally the decode-attention launch of their head
shapes. Writes roseinfer_kernels/tuned_launch.json (entries for other shapes are kept).

    python scripts/tune_models.py --models llama-3.1-8b,llama-3.2-1b [--attention llama-3.1-8b] [--workers 12]
    python scripts/tune_models.py --models llama-3.1-8b --weights fp8   # --quantization fp8's projections
    python scripts/tune_models.py --models llama-3.1-8b --weights fp8 --prequantized   # those fed e4m3 rows
    python scripts/tune_models.py --models llama-3.1-8b --buckets 1,4   # only those batch buckets
    python scripts/tune_models.py --models llama-3.1-8b --buckets 1,64 --tma   # with TMA weight loads too
    python scripts/tune_models.py --models gpt2 --dtype float16          # GPT-2 sizes too (its LM head padded to 50304)
    python scripts/tune_models.py --models "" --attention llama-3.1-8b --kv-cache-dtype fp8 --contexts 256,1024,4096
                                                                          # decode attention over e4m3 caches
"""

from __future__ import annotations

import argparse

import torch

from engine.architectures import decode_projection_shapes, named_architecture
from engine.loader import GPT2_SIZES, gpt2_config
from roseinfer_kernels.tune import parse_buckets, tune, tune_linear


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="llama-3.1-8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention", default="", help="names from roseinfer_kernels.tune.SHAPES to tune attention for")
    p.add_argument("--contexts", default="64,256,1024")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="--attention over e4m3 caches (--kv-cache-dtype fp8), keyed float8_e4m3fn")
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--out", default="roseinfer_kernels/tuned_launch.json")
    p.add_argument("--weights", choices=["dense", "fp8"], default="dense",
                   help="fp8: the float8 projections of --quantization fp8 (the LM head stays dense)")
    p.add_argument("--prequantized", action="store_true",
                   help="with --weights fp8: activations arriving in e4m3 with a scale per row (as the norms and "
                        "SiLU * up give FP8 projections), keyed float8_e4m3fn-prequantized; and o_proj's input "
                        "quantized first by fp8_rows.quantize_rows, keyed float8_e4m3fn-quantize-first")
    p.add_argument("--tma", action="store_true", help="also the skinny kernel's launches with TMA weight loads (Hopper)")
    p.add_argument("--buckets", default="", help="batch buckets to measure the projections at (e.g. 1,4); "
                   "default all, and the table keeps the others' entries")
    args = p.parse_args()
    shapes, unquantized_inputs = [], []
    for name in filter(None, args.models.split(",")):
        named = named_architecture(name)
        if named is not None:
            config = named[1]
        elif name in GPT2_SIZES:
            config = gpt2_config(*GPT2_SIZES[name])
        else:
            raise SystemExit(f"unknown architecture {name!r}")
        model_shapes = decode_projection_shapes(config)
        if args.weights == "fp8":
            model_shapes = model_shapes[:-1]  # the LM head (last) keeps the model dtype
        if args.prequantized:  # o_proj (second) takes attention's output as it is: quantized first
            unquantized_inputs += [model_shapes[1]]
            model_shapes = model_shapes[:1] + model_shapes[2:]
        shapes += [s for s in model_shapes if s not in shapes]
    if shapes:
        tune_linear(shapes, getattr(torch, args.dtype), args.out, args.workers, fp8=args.weights == "fp8",
                    prequantized=args.prequantized, buckets=parse_buckets(args.buckets), tma=args.tma)
    if unquantized_inputs:
        tune_linear(list(dict.fromkeys(unquantized_inputs)), getattr(torch, args.dtype), args.out, args.workers,
                    fp8=True, prequantized=True, quantize_first=True, buckets=parse_buckets(args.buckets), tma=args.tma)
    if args.attention:
        tune(tuple(int(c) for c in args.contexts.split(",")), args.out, tuple(args.attention.split(",")), args.workers,
             fp8_cache=args.kv_cache_dtype == "fp8")


if __name__ == "__main__":
    main()
