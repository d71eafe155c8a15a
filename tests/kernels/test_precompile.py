"""roseinfer_kernels.precompile: a manifest entry, in Triton's serialised specialisation format, compiles in a
spawned worker (for a named GPU target: no GPU here) into the on-disk cache under the key the
launch's own compile then finds; manifests merge and filter by model and target."""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")

from roseinfer_kernels.precompile import finish_precompile, in_cache, load_manifest, start_precompile, write_manifest  # noqa: E402

TARGET = {"backend": "cuda", "arch": 90, "warp_size": 32}


def _mask_logits_entry(block: int) -> tuple[dict, tuple]:
    """The manifest entry Triton's post-compile hook would record for roseinfer_kernels.token_bitmask's
    kernel at BLOCK=`block`, and the in-process compile's arguments for the same specialisation."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, serialize_specialization_data

    from roseinfer_kernels.token_bitmask import _mask_logits_kernel

    # (under TRITON_INTERPRET=1 the module holds the interpreted kernel: compile its function as the GPU would)
    kernel = _mask_logits_kernel if isinstance(_mask_logits_kernel, JITFunction) else JITFunction(_mask_logits_kernel.fn)

    target = GPUTarget(**TARGET)
    options = make_backend(target).parse_options({"num_warps": 4})
    signature = {"logits_ptr": "*fp32", "bitmask_ptr": "*i32", "stride_logits": "i32", "stride_bitmask": "i32",
                 "vocab": "i32", "BLOCK": "constexpr"}
    constants = {(5,): block}
    attrs = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
    spec = serialize_specialization_data("roseinfer_kernels.token_bitmask._mask_logits_kernel", signature, constants, attrs,
                                         options, "key", target)
    entry = {"module": "roseinfer_kernels.token_bitmask", "name": "_mask_logits_kernel", "spec": spec, "target": TARGET}
    return entry, (ASTSource(kernel, signature, constants, attrs), target, options.__dict__)


def _cached(cache_dir) -> set[str]:
    return {d for d in os.listdir(cache_dir)} if os.path.isdir(cache_dir) else set()


def _launch_side_compile(block: int) -> None:
    """The launch's own compile of the same specialisation, built from the kernel's objects rather
    than the manifest's JSON (in a fresh process: once interpreted kernels have run in this one,
    the interpreter's patches to triton.language break a real compile here)."""
    os.environ.pop("TRITON_INTERPRET", None)
    _, (src, target, options) = _mask_logits_entry(block)
    triton.compile(src, target=target, options=options)


def _in_fresh_process(fn, *args) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(fn, *args).result()


def test_a_manifest_entry_compiles_in_a_worker_under_the_launchs_cache_key(tmp_path, monkeypatch):
    cache = tmp_path / "triton-cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    entry, _ = _mask_logits_entry(512)
    assert finish_precompile(start_precompile([entry], workers=1)) == 1
    compiled = _cached(cache)
    assert any(f.endswith(".cubin") for d in compiled for f in os.listdir(cache / d)), compiled
    _in_fresh_process(_launch_side_compile, 512)  # a cache hit adds nothing (a miss would add an entry or fail)
    assert _cached(cache) == compiled


def test_a_compiled_entry_builds_its_launcher_where_a_gpu_driver_is_active(monkeypatch):
    """The worker asks the active GPU driver for the kernel's launcher (Triton 3.6 compiles one per
    signature into the cache, which the launch then finds); without a driver (here) it leaves that
    to the launch."""
    from types import SimpleNamespace

    import torch
    import triton.runtime

    from roseinfer_kernels.precompile import build_launcher

    built = []

    class GpuDriver:
        @staticmethod
        def launcher_cls(src, metadata):
            built.append((src, metadata))

    compiled = SimpleNamespace(metadata="the kernel's metadata")
    if not torch.cuda.is_available():
        assert build_launcher("src", compiled) is False and built == []
    monkeypatch.setattr(triton.runtime, "driver", SimpleNamespace(active=GpuDriver()))
    assert build_launcher("src", compiled) is True
    assert built == [("src", "the kernel's metadata")]


@pytest.mark.gpu
def test_a_cold_start_worker_builds_the_launcher_too(tmp_path, monkeypatch):
    """On a GPU host the compile worker leaves the kernel's launcher in the cache as well, so the
    first launch finds it instead of compiling C with gcc on the engine's thread."""
    from triton.backends.nvidia import driver as nvidia_driver

    if not hasattr(nvidia_driver, "make_launcher"):
        pytest.skip("this Triton launches through one generic launcher: nothing to build")
    cache = tmp_path / "triton-cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    entry, _ = _mask_logits_entry(2048)
    assert finish_precompile(start_precompile([entry], workers=1)) == 1
    files = [f for d in _cached(cache) for f in os.listdir(cache / d)]
    assert any(f.startswith("__triton_launcher") for f in files), files


def test_the_target_comes_from_torchs_capability(monkeypatch):
    """The engine names the manifest's target without starting Triton's driver (whose first start
    builds a C module on a cold cache): the same fields the driver reports."""
    import torch

    from roseinfer_kernels.precompile import cuda_target

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert cuda_target(torch.device("cuda", 0)) == TARGET


def _cache_lookups(block: int) -> tuple[bool, bool, bool]:
    """(in_cache of the entry, whether start_precompile starts a pool for it, in_cache after that
    pool), in a process without the interpreter (its kernels are then real JIT functions, as on a
    GPU host)."""
    os.environ.pop("TRITON_INTERPRET", None)
    entry, _ = _mask_logits_entry(block)
    before = in_cache(entry)
    started = start_precompile([entry], workers=1)
    finish_precompile(started)
    return before, started is not None, in_cache(entry)


def test_cached_entries_start_no_pool(tmp_path, monkeypatch):
    """A warm start finds every entry in the cache and spawns no workers (on the 8B their start-up
    alone was ~5 s of the ready time); an entry not yet compiled is not taken for a cached one."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(_cache_lookups, 256).result() == (False, True, True)  # cold: a pool compiles it
        assert pool.submit(_cache_lookups, 256).result() == (True, False, True)  # warm: found, no pool
        assert pool.submit(_cache_lookups, 1024).result() == (False, True, True)  # another specialisation


def test_entries_recorded_for_other_parameters_start_no_pool():
    """An entry whose kernel's parameters changed since it was recorded cannot compile: it is
    skipped before any worker starts (a pool started for it cost a warm start ~5 s on the H200).
    The shipped manifest's entries match today's kernels."""
    import json

    from roseinfer_kernels.precompile import manifest_path, matches_kernel

    entry, _ = _mask_logits_entry(512)
    assert matches_kernel(entry)
    spec = json.loads(entry["spec"])
    spec["signature"] = {**spec["signature"], "EXTRA": "constexpr"}
    changed = {**entry, "spec": json.dumps(spec)}
    assert not matches_kernel(changed)
    assert start_precompile([changed], workers=1) is None
    with open(manifest_path().rsplit("-", 1)[0] + "-3.6.0.json") as f:  # the GPU host's Triton
        shipped = json.load(f)["entries"]
    stale = [e["name"] for e in shipped if not matches_kernel(e)]
    assert shipped and not stale, (f"{stale}: parameters changed since the manifest was recorded; re-record it on a GPU "
                                   "(READY_RECORD=1 bash scripts/gpu_suite.sh ready OUT) or drop those entries")


def test_a_stale_entry_is_skipped():
    entry = {"module": "roseinfer_kernels.token_bitmask", "name": "no_such_kernel", "spec": _mask_logits_entry(512)[0]["spec"]}
    assert finish_precompile(start_precompile([entry], workers=1)) == 0


def test_manifests_merge_and_filter_by_model_and_target(tmp_path):
    path = str(tmp_path / "manifest.json")
    entry, _ = _mask_logits_entry(512)
    assert write_manifest(path, [entry, entry], "gpt2 dtype=auto") == 1
    assert write_manifest(path, [entry], "llama-3.1-8b dtype=auto") == 2
    assert write_manifest(path, [entry], "gpt2 dtype=auto") == 2
    assert len(load_manifest(path, "gpt2 dtype=auto", TARGET)) == 1
    other, _ = _mask_logits_entry(1024)  # a new recording replaces that model's entries (stale ones go)
    assert write_manifest(path, [other], "gpt2 dtype=auto") == 2
    assert load_manifest(path, "gpt2 dtype=auto", TARGET) == [{**other, "model": "gpt2 dtype=auto"}]
    assert len(load_manifest(path, "llama-3.1-8b dtype=auto", TARGET)) == 1
    assert load_manifest(path, "gpt2 dtype=auto", {**TARGET, "arch": 80}) == []
    assert load_manifest(str(tmp_path / "missing.json"), "gpt2 dtype=auto", TARGET) == []
