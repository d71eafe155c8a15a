"""The C++ CPU kernels (kernels/cpu/*.cpp), compiled once per machine and loaded on first use.

torch's extension builder compiles them with `-O3 -march=native` (so the machine's vector units,
AVX-512 here, are used) into ~/.cache/torch_extensions, keyed by the sources: later loads take
milliseconds. `make install` builds them ahead of time (`python -m kernels.cpu_build`).
"""

from __future__ import annotations

import functools
import logging
import os
import time

logger = logging.getLogger(__name__)

SOURCES = ("module.cpp", "gguf_gemm.cpp", "decode_attention.cpp", "elementwise.cpp")


@functools.lru_cache(maxsize=1)
def extension():
    """The compiled module: gguf_linear, gguf_dequantize, rotary_write_kv, paged_decode,
    add_rms_norm, silu_mul."""
    from torch.utils.cpp_extension import load

    start = time.monotonic()
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu")
    module = load(name="roseinfer_cpu_kernels", sources=[os.path.join(here, s) for s in SOURCES],
                  extra_cflags=["-O3", "-march=native"], verbose=False)
    logger.info("CPU kernels ready in %.1f s", time.monotonic() - start)
    return module


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the kernels build and load here (a compiler and torch's headers are needed)."""
    try:
        extension()
        return True
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path
        logger.warning("CPU kernels unavailable, using plain torch: %s", str(exc).strip().splitlines()[-1:])
        return False


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    extension()
