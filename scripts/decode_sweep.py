"""Decode-kernel launch candidates across context lengths for one shape (what the tuned table keys on).

    python scripts/decode_sweep.py --batch 64 --contexts 64,128,256,512,1024

Prints, per context, the best candidates and the fraction of device-copy bandwidth each reaches.
"""

import argparse
import itertools

import torch
import triton.testing

from roseinfer_kernels.paged_attention import DecodeLaunch, paged_decode
from roseinfer_kernels.tune import make_inputs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=12)
    p.add_argument("--contexts", default="64,128,256,512,1024")
    p.add_argument("--top", type=int, default=6)
    args = p.parse_args()
    src = torch.empty(1024**3 // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=50, return_mode="median")
    copy_bw = 2 * src.numel() * 2 / (copy_ms * 1e-3)
    print(f"device copy {copy_bw / 1e12:.2f} TB/s")
    cands = [DecodeLaunch(t, s, w, st) for t, w, st, s in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4), (1, 2, 4))]
    for context in map(int, args.contexts.split(",")):
        q, k, v, tables, lens = make_inputs(args.batch, context, args.heads, args.kv_heads, 64, torch.float16)
        out = torch.empty_like(q)
        kv_bytes = 2 * args.batch * context * args.kv_heads * 64 * 2
        res = []
        for c in cands:
            try:
                ms = triton.testing.do_bench(lambda: paged_decode(q, k, v, tables, lens, 0.125, c, out=out), warmup=5, rep=25, return_mode="median")
            except Exception:
                continue
            res.append((ms, c))
        res.sort(key=lambda r: r[0])
        for ms, c in res[: args.top]:
            print(f"ctx {context:5d}  {ms * 1e3:7.2f} us  {kv_bytes / (ms * 1e-3) / copy_bw:6.1%} of copy  {c}", flush=True)
        fixed = next(ms for ms, c in res if c == DecodeLaunch(128, 1, 4, 3))
        print(f"ctx {context:5d}  table-like (128,1,4,3): {fixed * 1e3:.2f} us", flush=True)


if __name__ == "__main__":
    main()
