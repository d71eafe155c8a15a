"""Programmatic dependent launch (PDL, Hopper and newer): a kernel launched with it may start while
the kernel before it on the stream is still finishing, and must call `gdc_wait` before it reads
anything that kernel wrote.

At decode a layer is a chain of small kernels, each a few microseconds, and much of each is the
launch and ramp-up the previous kernel's tail could hide. Every kernel here that takes `pdl` calls
`tl.extra.cuda.gdc_wait()` in every program, unconditionally and before its first load of data
another kernel writes: a program that could finish without waiting would let the next kernel
start before the kernel two back had finished. The wait returns at once when the previous kernel
was not launched with PDL (cuBLAS, torch), so mixed chains stay correct.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def wait_for_previous_kernel(USE_PDL: tl.constexpr):
    """Call first in every program of a kernel launched with `pdl_launch`: waits until the previous
    kernel's writes are visible, then lets the next kernel start launching."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def pdl_launch(pdl: bool, like: torch.Tensor) -> dict:
    """Kernel-launch options for `pdl` (plus the USE_PDL constexpr); off on the CPU interpreter."""
    on = pdl and like.is_cuda
    return {"USE_PDL": on, **({"launch_pdl": True} if on else {})}


def pdl_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
