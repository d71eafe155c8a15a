"""Compiling the engine's Triton kernels ahead of their first launch, in parallel processes.

A cold start (an empty Triton cache: a new machine, a new Triton) compiles every kernel
specialisation the engine launches, one after another on the main thread, because the first
launch of each compiles it: the 8B architecture on an H100 compiles 16 in 6.6 s
(`scripts/load_speed.py --compile-times`). Threads do not help (Triton's compiler holds the GIL).

Which specialisations a model launches does not change from run to run, so a *manifest* lists
them: `record_compiles` collects each compile's specialisation data (Triton's own serialised form,
through its post-compile hook) while an engine starts, and `write_manifest` writes them into a
JSON file. At a cold start `start_precompile` compiles a manifest's entries for this device in a
pool of processes (spawned; they name the target, so they need no GPU) into Triton's on-disk
cache while the main process loads weights; the launches then load the compiled kernels from the
cache. An entry recorded for a kernel whose parameters have changed since is skipped (with a
warning to re-record); the launch compiles its own specialisation as it would have.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor

logger = logging.getLogger(__name__)

MANIFEST_DIR = os.path.join(os.path.dirname(__file__), "compile_manifests")


def manifest_path() -> str:
    """This Triton version's manifest (specialisation data is Triton's own format)."""
    import triton

    return os.path.join(MANIFEST_DIR, f"triton-{triton.__version__}.json")


@contextlib.contextmanager
def record_compiles() -> Iterator[list[dict]]:
    """Within: each Triton kernel specialisation compiled (or loaded from the on-disk cache) in
    this process is appended to the yielded list as a manifest entry."""
    from triton import knobs

    entries: list[dict] = []

    def hook(*, fn, compile, **_) -> None:
        spec = compile["specialization_data"]
        # Triton 3.6 leaves the target out of its specialisation data (later versions keep it):
        # the entry names it, as the launching device reports it
        target = json.loads(spec).get("target") or _current_target()
        entries.append({"module": fn.module, "name": fn.name, "spec": spec, "target": target})

    previous = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = hook
    try:
        yield entries
    finally:
        knobs.runtime.jit_post_compile_hook = previous


def _current_target() -> dict:
    import triton

    return dict(triton.runtime.driver.active.get_current_target().__dict__)


def cuda_target(device) -> dict:
    """A CUDA device's Triton target (GPUTarget's fields), as Triton's driver reports it (torch's
    compute capability, 32-thread warps), without starting that driver: its first start in a
    process builds a C helper module with gcc where the cache lacks it, which on a cold start
    would delay the compile workers by that long."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return {"backend": "cuda", "arch": major * 10 + minor, "warp_size": 32}


def write_manifest(path: str, entries: list[dict], model: str) -> int:
    """Write `entries`, tagged with `model` (the engine's key for a model and its launch settings),
    into the manifest at `path` (created if missing) in place of what it held for `model` (an entry
    a changed kernel no longer matches would never be found in the cache, and would start the
    compile pool on every warm start); other models' entries stay. Returns its entry count."""
    entries = [{**e, "model": model} for e in entries]
    known: list[dict] = []
    if os.path.exists(path):
        with open(path) as f:
            known = [e for e in json.load(f)["entries"] if e.get("model") != model]
    seen = {json.dumps(e, sort_keys=True) for e in known}
    for entry in entries:
        text = json.dumps(entry, sort_keys=True)
        if text not in seen:
            seen.add(text)
            known.append(entry)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"entries": known}, f, indent=1)
    return len(known)


def load_manifest(path: str, model: str, target: dict) -> list[dict]:
    """The entries of the manifest at `path` (none if it is missing) recorded for `model` and
    compiled for `target` (a GPUTarget's fields)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        entries = json.load(f)["entries"]
    return [e for e in entries if e.get("model") == model and e.get("target") == target]


def _decode_constant(value):
    import triton.language as tl

    if isinstance(value, str) and tl.dtype.is_dtype(value):
        return tl.dtype(value)
    if isinstance(value, dict) and "constexpr" in value:
        inner = value["constexpr"]
        return tl.constexpr(tuple(inner) if isinstance(inner, list) else inner)
    if isinstance(value, dict) and "jit_function" in value:
        module, name = value["jit_function"].split(":")
        return getattr(importlib.import_module(module), name)
    return tuple(value) if isinstance(value, list) else value


def _kernel_of(entry: dict):
    """The Triton function a manifest entry was recorded for (raises if it is gone)."""
    return getattr(importlib.import_module(entry["module"]), entry["name"].rsplit(".", 1)[-1])


def _entry_source(entry: dict):
    """(ASTSource, GPUTarget, options) of a manifest entry: the JIT's source, its signature,
    constants, attributes and options, decoded as Triton's preload decodes them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    data = json.loads(entry["spec"])
    fn = _kernel_of(entry)
    untuple = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731 - JSON made the tuples lists
    constexprs = {tuple(k): _decode_constant(v) for k, v in zip(data["constant_keys"], data["constant_vals"])}
    attrs = {tuple(k): v for k, v in zip(data["attrs_keys"], data["attrs_vals"])}
    signature = {k: untuple(v) for k, v in data["signature"].items()}
    options = {k: untuple(v) for k, v in data["options"].items()}
    return ASTSource(fn, signature, constexprs, attrs), GPUTarget(**entry["target"]), options


def compile_entry(entry: dict) -> str:
    """Compile one manifest entry into Triton's on-disk cache (its target named: no GPU needed),
    and its launcher where a GPU driver is present; returns the kernel's name. The same keys as
    the launch's own compile."""
    # A real compile for a real target, whatever the parent ran under (the kernels' modules
    # import as interpreted functions with TRITON_INTERPRET=1, as the CPU tests run).
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    src, target, options = _entry_source(entry)
    build_launcher(src, triton.compile(src, target=target, options=options))
    return entry["name"]


def build_launcher(src, compiled) -> bool:
    """Build a compiled kernel's host-side launcher into Triton's cache, as its first launch would.
    Triton 3.6 generates C for each kernel signature and compiles it with gcc at that launch, in
    the launching process, one after another. On the 8B's cold start the graph captures took
    3.5 s longer than warm with every kernel already compiled, likely these builds (not yet
    measured apart). Later Tritons launch through one generic launcher, and building it costs
    nothing. False where no GPU driver is present (a CPU test): the launch builds its own."""
    from triton.runtime import driver

    try:
        launcher_cls = driver.active.launcher_cls
    except RuntimeError:  # no active GPU driver in this process
        return False
    launcher_cls(src, compiled.metadata)
    return True


def matches_kernel(entry: dict) -> bool:
    """Whether the entry's kernel still exists and takes the parameters it was recorded with. A
    kernel whose parameters changed since the manifest was recorded can never compile from it (its
    launch compiles its own); one whose body alone changed still can, under its new cache key."""
    try:
        return list(json.loads(entry["spec"])["signature"]) == list(_kernel_of(entry).arg_names)
    except Exception:  # noqa: BLE001 - a module or kernel gone, or an entry of another format
        return False


def in_cache(entry: dict) -> bool:
    """Whether Triton's on-disk cache already holds this entry's kernel: the lookup
    `triton.compile` makes before it compiles (the metadata file named after the kernel, under
    the hash of its cache key). Warm starts then skip the worker pool, whose start-up (a spawned
    process importing torch and Triton) cost ~5 s of the 8B's ready time on the H200 for nothing
    to compile. Anything unexpected (another Triton's internals) answers False: the pool
    compiles it, as before."""
    try:
        import hashlib

        from triton import knobs
        from triton.compiler import compiler

        if knobs.compilation.always_compile or knobs.runtime.add_stages_inspection_hook is not None:
            return False
        src, target, options = _entry_source(entry)
        backend = compiler.make_backend(target)
        options = backend.parse_options(dict(options, **src.parse_options()))
        key = compiler.get_cache_key(src, backend, options, env_vars=compiler.get_cache_invalidating_env_vars())
        manager = compiler.get_cache_manager(hashlib.sha256(key.encode("utf-8")).hexdigest())
        name = f"{src.name[:150]}.json"
        return bool((manager.get_group(name) or {}).get(name))
    except Exception:  # noqa: BLE001 - only an optimisation: the pool compiles what this cannot tell
        return False


@contextlib.contextmanager
def spawn_without_main() -> Iterator[None]:
    """Within: processes started with the spawn method do not import the parent's `__main__`.
    A spawned child runs the parent's main script or -m module again (as `__mp_main__`), so a
    user's script that builds an engine at its top level, without an `if __name__ == "__main__"`
    guard, would build one again in every worker and then fail. The engine's workers (these
    compile processes, grammar workers, tensor-parallel ranks) run functions of importable modules
    on arguments from them and need nothing from the script: its main module is hidden while they
    start."""
    import sys
    import types

    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    sys.modules["__main__"] = types.ModuleType("__main__")  # no __file__, no __spec__: nothing to run
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def start_precompile(entries: list[dict], workers: int | None = None) -> tuple[ProcessPoolExecutor, list[Future]] | None:
    """Compile `entries` (those that match their kernels and are not in Triton's cache already) in a
    pool of spawned processes (fork is unsafe after CUDA starts), in the background; None when
    there is nothing to compile. The caller waits on the futures (or not: a launch whose kernel is
    not in the cache yet compiles it itself) and shuts the pool down."""
    current = [e for e in entries if matches_kernel(e)]
    if len(current) < len(entries):  # skipped: they would only keep a worker busy, or start a pool for nothing
        logger.warning("precompile: %d of %d manifest entries no longer match their kernels' parameters; "
                       "re-record the manifest (ROSEINFER_RECORD_COMPILES=1)", len(entries) - len(current), len(entries))
    entries = [e for e in current if not in_cache(e)]
    if not entries:
        return None
    workers = workers or max(1, min(len(entries), (os.cpu_count() or 2) // 2))
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    with spawn_without_main():  # (the pool starts its processes as work is submitted)
        return pool, [pool.submit(compile_entry, entry) for entry in entries]


def finish_precompile(started: tuple[ProcessPoolExecutor, list[Future]] | None, timeout_s: float = 60.0) -> int:
    """Wait for a `start_precompile` pool (at most `timeout_s`) and shut it down; returns how many
    entries compiled. A failed entry is logged and skipped: its launch compiles it."""
    if started is None:
        return 0
    pool, futures = started
    done, deadline = 0, time.monotonic() + timeout_s
    for future in futures:
        try:
            future.result(timeout=max(0.0, deadline - time.monotonic()))
            done += 1
        except Exception as exc:  # noqa: BLE001 - a stale entry: the launch compiles its own
            logger.info("precompile: an entry did not compile in time or at all (%s)", (str(exc) or repr(exc)).splitlines()[0][:200])
    # Every entry finished (compiled or failed): wait for the idle workers to exit (~0.5 s here for
    # workers that imported torch; cold starts only). Shut down without waiting, an idle worker
    # could be left waiting for work and the process's exit then joined it for good: the precompile
    # test hung in 3 of 8 runs on this 2-core box under load (0 of 12 waiting; a shutdown waiting
    # on a thread of its own still hung 1 of 10), and on the H200 an exit after ready spent 7.1 s
    # joining this pool (docs/BENCHMARKS.md, seventeenth session). Only a compile still running at
    # the deadline is left behind, so the engine does not wait for it.
    pool.shutdown(wait=all(f.done() for f in futures), cancel_futures=True)
    return done
