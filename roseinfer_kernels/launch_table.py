"""Launch parameters for the attention kernels, decided once per shape bucket.

`roseinfer_kernels/tune.py` measures candidates on the current GPU and writes
`tuned_launch.json` beside this file; without an entry, a heuristic picks.
The engine looks parameters up once (at load or CUDA-graph capture) and
passes them down, so no lookup or autotune wrapper runs per launch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import lru_cache

from roseinfer_kernels.linear import LinearLaunch
from roseinfer_kernels.paged_attention import DecodeLaunch, PrefixLaunch
from roseinfer_kernels.prefill_attention import PrefillLaunch

TABLE_PATH = os.path.join(os.path.dirname(__file__), "tuned_launch.json")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def batch_bucket(num_seqs: int) -> int:
    for b in BATCH_BUCKETS:
        if num_seqs <= b:
            return b
    return BATCH_BUCKETS[-1]


def decode_key(dtype: str, head_dim: int, group: int, block_size: int, num_seqs: int) -> str:
    return f"decode/{dtype}/d{head_dim}/g{group}/bs{block_size}/b{batch_bucket(num_seqs)}"


@lru_cache(maxsize=4)
def load_table(path: str = TABLE_PATH, section: str = "entries") -> dict:
    """The table's launches ("entries"), or what the tuner measured for them ("measured")."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f).get(section, {})


def heuristic_decode_launch(head_dim: int, group: int, num_seqs: int, num_kv_heads: int, num_sms: int) -> DecodeLaunch:
    # Tensor-core tiles of [16, tokens] x [tokens, head_dim]: 64 tokens keeps registers low for head_dim <= 128.
    tokens = 64 if head_dim <= 128 else 32
    programs = num_seqs * num_kv_heads
    splits = 1 if programs >= num_sms else min(16, -(-2 * num_sms // programs))
    return DecodeLaunch(tokens=tokens, num_splits=splits, num_warps=4, num_stages=2)


# Decode launches for an e4m3 cache are keyed by the cache's dtype: widening each K/V value costs
# issue slots the model dtype's kernel does not spend, and the best launch differs (8B, batch 64,
# context 3840 on the H200, K/V widened to bf16: 4 warps 218 us a layer, the bf16 table's 8 warps 295).
FP8_CACHE_KEY = "float8_e4m3fn"


def decode_launch(dtype: str, head_dim: int, group: int, block_size: int, num_seqs: int, num_kv_heads: int,
                  num_sms: int, table_path: str = TABLE_PATH, fp8_cache: bool = False) -> DecodeLaunch:
    """The decode kernel's launch for this shape and batch. `fp8_cache`: an e4m3 cache's entry
    where the table has one at a bucket, else the model dtype's at that bucket."""
    table = load_table(table_path)
    dtypes = (FP8_CACHE_KEY, dtype) if fp8_cache else (dtype,)
    # The tuned bucket at or above this batch, else the nearest below.
    for b in sorted(BATCH_BUCKETS, key=lambda b: (b < batch_bucket(num_seqs), abs(b - num_seqs))):
        for key_dtype in dtypes:
            entry = table.get(decode_key(key_dtype, head_dim, group, block_size, b))
            if entry is not None:
                return DecodeLaunch(**entry)
    return heuristic_decode_launch(head_dim, group, num_seqs, num_kv_heads, num_sms)


def linear_key(dtype: str, n: int, k: int, bucket: int) -> str:
    """`dtype` is the weights' (float8_e4m3fn for FP8 projections) or, for dense ones, the model's."""
    return f"linear/{dtype}/n{n}/k{k}/b{bucket}"


def has_linear_entry(dtype: str, n: int, k: int, bucket: int, table_path: str = TABLE_PATH) -> bool:
    return linear_key(dtype, n, k, bucket) in load_table(table_path)


# Without a tuned entry, the skinny kernel serves batches up to this size (cuBLAS above): on the
# H100 (scripts/step_parts.py) it beat cuBLAS at batch 64 for GPT-2's projections only when launched
# with PDL, and larger batches were not measured.
HEURISTIC_LINEAR_MAX_ROWS = 64


def heuristic_linear_launch(k: int, bucket: int) -> LinearLaunch | None:
    if bucket > HEURISTIC_LINEAR_MAX_ROWS:
        return None
    # 32 columns a program and 128-wide K tiles were best for every K <= 768 projection measured;
    # a long K (GPT-2's fc2, 3072) is split three ways so that enough programs stream the weights.
    return LinearLaunch(block_n=32, block_k=128, split_k=1 if k <= 1024 else 3, num_warps=4, num_stages=3)


def linear_launch(dtype: str, n: int, k: int, bucket: int, table_path: str = TABLE_PATH,
                  heuristic: bool = True) -> LinearLaunch | None:
    """The skinny-kernel launch for an [n, k] projection at this batch bucket, or None for cuBLAS.
    A tuned entry of null means cuBLAS measured faster. Without an entry, the heuristic's launch
    (or cuBLAS when `heuristic` is False: a shape the heuristic was never measured on)."""
    table = load_table(table_path)
    key = linear_key(dtype, n, k, bucket)
    if key in table:
        entry = table[key]
        return None if entry is None else LinearLaunch(**entry)
    return heuristic_linear_launch(k, bucket) if heuristic else None


# FP8 projections whose activations arrive in e4m3 with a scale per row (from the norm or SiLU
# before them): their own entries, measured by `roseinfer_kernels.tune --weights fp8 --prequantized`.
PREQUANTIZED_KEY = "float8_e4m3fn-prequantized"


def prequantized_linear_launch(n: int, k: int, bucket: int, table_path: str = TABLE_PATH) -> LinearLaunch | None:
    """The skinny launch for an FP8 [n, k] projection on e4m3 activations at this bucket, or None
    for cuBLASLt (`torch._scaled_mm` on them as they are). Without a measured entry: the fp8
    weights' own entry's tiles (the same bytes through the same loop, and the measurements that
    exist put both on similar tiles), else the heuristic."""
    table = load_table(table_path)
    key = linear_key(PREQUANTIZED_KEY, n, k, bucket)
    if key in table:
        return None if table[key] is None else LinearLaunch(**table[key])
    launch = linear_launch("float8_e4m3fn", n, k, bucket, table_path)
    return None if launch is None else dataclasses.replace(launch, act_fp8=False)


# FP8 projections whose input no kernel of ours writes in e4m3 (o_proj, after attention), quantized
# first by roseinfer_kernels.fp8_rows.quantize_rows: measured with that launch included.
QUANTIZE_FIRST_KEY = "float8_e4m3fn-quantize-first"


def quantize_first_launch(n: int, k: int, bucket: int, table_path: str = TABLE_PATH) -> tuple[bool, LinearLaunch | None]:
    """(quantize first?, then the skinny launch or None for cuBLASLt) for an FP8 [n, k] projection
    fed unquantized activations at this bucket: yes only where the tuner measured quantizing first
    faster than the projection's own launch (W8A16, W8A8 or cuBLASLt after torch's quantizing);
    without both measurements, no (the launch as before)."""
    measured = load_table(table_path, "measured")
    first = measured.get(linear_key(QUANTIZE_FIRST_KEY, n, k, bucket))
    own = measured.get(linear_key("float8_e4m3fn", n, k, bucket))
    if first is None or own is None or first["us"] >= own["us"]:
        return False, None
    entry = load_table(table_path).get(linear_key(QUANTIZE_FIRST_KEY, n, k, bucket))
    return True, None if entry is None else LinearLaunch(**entry)


def cascade_prefix_launch(head_dim: int) -> PrefixLaunch:
    """cascade_decode's shared-prefix kernel: few programs, each a short loop, so its launch
    matters little next to the remainder's (scripts/decode_attention_bw.py measures the options)."""
    return PrefixLaunch(block_q=64, tokens=64 if head_dim <= 64 else 32, num_warps=4, num_stages=2)


def prefill_launch(head_dim: int) -> PrefillLaunch:
    if head_dim >= 128:
        return PrefillLaunch(block_m=64, block_n=32, num_warps=4, num_stages=2)
    return PrefillLaunch(block_m=64, block_n=64, num_warps=4, num_stages=2)
