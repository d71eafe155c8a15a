"""The C++ CPU kernels (roseinfer_kernels/cpu/*.cpp), compiled once per machine and loaded on first use.

torch's extension builder compiles them with `-O3 -march=native` (so the machine's vector units,
AVX-512 here, are used). `make install` builds them ahead of time (`python -m roseinfer_kernels.cpu_build`).

Where they go, and why loading takes no lock: torch's own `load()` guards every call, even one that
finds the library already built, with a lock *file* it removes when done. A process killed inside
that window (a server stopped at start-up, a worker killed by a test) leaves the file behind, and
every later process waits on it forever. So the build goes to a directory named by a hash of what
determines the binary (sources, flags, torch, Python, CPU), marked complete by a `ready` file written
after the library has loaded once; a process that finds `ready` imports the library directly. Only
a build takes a lock, an flock(2) that the kernel releases when its holder dies. Checkouts with the
same sources share one build.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import sys
import time

logger = logging.getLogger(__name__)

NAME = "roseinfer_cpu_kernels"
SOURCES = ("module.cpp", "gguf_gemm.cpp", "decode_attention.cpp", "elementwise.cpp", "decode_layers.cpp")
HEADERS = ("kernels.h",)
CFLAGS = ("-O3", "-march=native")
SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu")


def _cpu_flags() -> str:
    """The CPU's feature flags: `-march=native` code built on one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def build_directory() -> str:
    """~/.cache/roseinfer/cpu_kernels/<hash of sources, flags, torch, Python and CPU>."""
    import torch

    digest = hashlib.sha256()
    for source in SOURCES + HEADERS:
        with open(os.path.join(SOURCE_DIR, source), "rb") as f:
            digest.update(source.encode() + b"\0" + f.read())
    digest.update(repr((CFLAGS, torch.__version__, sys.version, platform.machine(), _cpu_flags())).encode())
    root = os.environ.get("ROSEINFER_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "roseinfer"))
    return os.path.join(root, "cpu_kernels", digest.hexdigest()[:16])


def _import_built(directory: str):
    import torch  # noqa: F401 - the library links against torch's, which must be loaded first

    spec = importlib.util.spec_from_file_location(NAME, os.path.join(directory, NAME + ".so"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(directory: str):
    from torch.utils.cpp_extension import load

    os.makedirs(directory, exist_ok=True)
    with open(directory + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        if os.path.exists(os.path.join(directory, "ready")):
            return _import_built(directory)  # another process built it while we waited
        # Under our lock no one else is building here: a lock file of torch's is from a dead process.
        stale = os.path.join(directory, "lock")
        if os.path.exists(stale):
            os.remove(stale)
        module = load(name=NAME, sources=[os.path.join(SOURCE_DIR, s) for s in SOURCES],
                      extra_cflags=list(CFLAGS), build_directory=directory, verbose=False)
        open(os.path.join(directory, "ready"), "w").close()
        return module


@functools.lru_cache(maxsize=1)
def extension():
    """The compiled module: gguf_linear, gguf_dequantize, rotary_write_kv, paged_decode,
    add_rms_norm, silu_mul."""
    start = time.monotonic()
    directory = build_directory()
    if os.path.exists(os.path.join(directory, "ready")):
        module = _import_built(directory)
    else:
        module = _build(directory)
    logger.info("CPU kernels ready in %.1f s (%s)", time.monotonic() - start, directory)
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
