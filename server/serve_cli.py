"""`roseinfer serve`: load the model, then serve the OpenAI API under uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import time
from contextlib import asynccontextmanager

logger = logging.getLogger("roseinfer.serve")


def add_serve_parser(sub) -> None:
    from engine.config import add_engine_args

    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", default=None, help="name clients use in `model` (default: --model)")
    g.add_argument("--api-key", default=os.environ.get("ROSEINFER_API_KEY"), help="require Authorization: Bearer KEY on /v1/* (env ROSEINFER_API_KEY)")
    g.add_argument("--max-waiting", type=int, default=None, help="answer 429 past this many queued requests")
    g.add_argument("--max-request-bytes", type=int, default=8 * 1024**2)
    g.add_argument("--shutdown-timeout", type=float, default=10.0, help="seconds to finish in-flight requests on SIGTERM")
    g.add_argument("--uvicorn-log-level", default="warning")
    g.add_argument("--no-engine-process", action="store_true",
                   help="run the engine in the server's process (default: its own process, so HTTP work and "
                        "the engine's host work do not share one GIL)")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="engine cores, each its own process and GPU (or --tensor-parallel-size GPUs), behind the "
                        "API processes; a request goes to the least-loaded core, or to one that holds its prefix")
    g.add_argument("--api-server-count", type=int, default=None,
                   help="HTTP front-end processes sharing the one engine process and the port (as vLLM's "
                        "option): request parsing and streaming, which one event loop does in turn, spread "
                        "over N cores. Default: on a GPU, a quarter of the CPU cores, at most 4; else 1")
    g.add_argument("--tune-gc", action=argparse.BooleanOptionalAction, default=True,
                   help="freeze the server's start-up heap out of Python's cyclic GC and collect its youngest "
                        "generation less often (default: on)")
    p.set_defaults(func=cmd_serve)


def build_server_app(args: argparse.Namespace, core=None, metrics_multiprocess_dir: str | None = None):
    """The app over `core` (an engine, or a client of an engine process); by default one started
    here as the flags say."""
    from engine.async_engine import AsyncEngine
    from engine.engine_process import EngineCoreClient
    from engine.llm_engine import LLMEngine
    from server.app import ServerSettings, build_app, default_aliases
    from engine.config import engine_config_from_args

    config = engine_config_from_args(args)
    if core is None and args.data_parallel_size > 1:
        from engine.data_parallel import engine_client, links_of, start_engine_cores

        handles = start_engine_cores(config, args.data_parallel_size)
        core = engine_client(config, links_of(handles), owned=handles)
    if core is None:
        core = LLMEngine(config) if args.no_engine_process else EngineCoreClient(config)
    engine = AsyncEngine(engine=core, max_waiting=args.max_waiting)
    settings = ServerSettings(
        served_model_name=args.served_model_name or config.model,
        api_key=args.api_key,
        max_request_bytes=args.max_request_bytes,
        model_aliases=default_aliases(config.model),
        metrics_multiprocess_dir=metrics_multiprocess_dir,
    )
    app = build_app(engine, settings)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        # uvicorn has stopped accepting and waited for in-flight requests: abort the rest.
        for request_id in list(engine.engine.requests):
            engine.abort(request_id)
        await engine.shutdown()

    app.router.lifespan_context = lifespan
    return app


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.errors import EngineError

    if args.node_rank > 0:  # another host of a tensor-parallel group: its ranks, no HTTP
        from engine.config import engine_config_from_args
        from engine.model_runner import run_tp_worker
        from engine.tp_group import run_node

        return run_node(engine_config_from_args(args), run_tp_worker)

    args.api_server_count = default_api_server_count(args)
    if args.api_server_count < 1 or args.data_parallel_size < 1:
        logger.error("--api-server-count and --data-parallel-size must be at least 1")
        return 2
    if args.data_parallel_size > 1 and args.no_engine_process:
        logger.error("--data-parallel-size needs the engine cores in their own processes (drop --no-engine-process)")
        return 2
    if args.api_server_count > 1:
        if args.no_engine_process:
            logger.error("--api-server-count needs the engine in its own process (drop --no-engine-process)")
            return 2
        return _serve_with_api_processes(args)
    try:
        app = build_server_app(args)
    except EngineError as exc:
        logger.error("%s", exc.message)
        return 2
    logger.info("serving %s on http://%s:%d/v1", args.served_model_name or args.model, args.host, args.port)
    _run_uvicorn(app, args)
    return 0


def default_api_server_count(args: argparse.Namespace) -> int:
    """--api-server-count, or its default. On a GPU one API process is the bottleneck of a burst:
    GPT-2 on an H100, 512 requests at once, HTTP reached 77-90% of the in-process throughput with
    one API process and 90-103% with four, in four calls (docs/BENCHMARKS.md). On the CPU the
    engine itself needs the cores."""
    if args.api_server_count is not None:
        return args.api_server_count
    if args.no_engine_process:
        return 1
    from engine.model_runner import resolve_device

    try:
        on_gpu = resolve_device(args.device).type == "cuda"
    except (ValueError, RuntimeError):  # the engine reports a bad --device itself
        return 1
    return max(1, min(4, (os.cpu_count() or 1) // 4)) if on_gpu else 1


def _run_uvicorn(app, args: argparse.Namespace, sockets=None) -> None:
    import gc

    import uvicorn

    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
        timeout_graceful_shutdown=int(args.shutdown_timeout), access_log=False,
    )
    # Server.run, not asyncio.run(serve()): it builds the loop from config.loop, so uvloop serves
    # when installed (http="auto" picks httptools either way). On the CPU here uvloop did not
    # change the server's CPU per streamed token (63 vs 64 us); it is the library's default.
    if args.tune_gc:
        # The app, tokenizer and imported modules live as long as the process: move them out of
        # the cyclic collector's generations, so the collections a burst of requests triggers
        # scan the burst's own objects, not the whole heap; and collect the youngest generation
        # every 20,000 allocations instead of 700 (a request allocates thousands of objects).
        # API-process CPU per request on the CPU here: 882 us -> 667 (freeze) -> 576 (both).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 10, 10)
    _GracefulServer(config).run(sockets=sockets)


def _serve_with_api_processes(args: argparse.Namespace) -> int:
    """`--api-server-count N`: this process starts the engine process and N API processes, each
    listening on the port with SO_REUSEPORT, then supervises: SIGINT/SIGTERM drains them all; if
    one dies, the rest stop. With SO_REUSEPORT the kernel deals new connections to the listeners
    by a hash of the client's address; one shared listening socket instead let whichever process
    woke first accept most of a burst (on the CPU here, 4 of 5 parts of the API CPU in one)."""
    import multiprocessing as mp
    import shutil
    import signal
    import tempfile
    import threading

    from engine.data_parallel import links_of, start_engine_cores
    from engine.engine_process import reap
    from engine.errors import EngineError
    from engine.config import engine_config_from_args

    try:
        cores = start_engine_cores(engine_config_from_args(args), args.data_parallel_size, args.api_server_count)
    except EngineError as exc:
        logger.error("%s", exc.message)
        return 2

    def stop_cores() -> None:
        for core in cores:
            core.stop()

    try:  # fail here, not in N processes, when the port is taken (bound, never listening)
        _port_socket(args.host, args.port).close()
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        stop_cores()
        return 2
    metrics_dir = tempfile.mkdtemp(prefix="roseinfer-metrics-")
    # prometheus_client reads this when an API process imports it: they share metric files there.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    # From here on a signal only asks to stop: starting an API process blocks until it has read
    # its arguments (the tokenizer, some MB), by when the first may already serve and a client
    # may already ask us to stop; dying of that signal here would orphan the started ones.
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    ctx = mp.get_context("spawn")
    workers = []
    status = 0
    try:
        for i in range(args.api_server_count):
            if stop.is_set():
                break
            worker = ctx.Process(target=_api_process, args=(args, links_of(cores, i), metrics_dir, os.getpid()),
                                 name=f"roseinfer-api-{i}")
            worker.start()
            workers.append(worker)
        for core in cores:  # each API process holds its own copies now
            for commands, results in core.pipes:
                commands.close()
                results.close()
        logger.info("serving %s on http://%s:%d/v1 from %d API processes", args.served_model_name or args.model,
                    args.host, args.port, len(workers))
        while not stop.wait(0.2):
            gone = [w for w in workers if not w.is_alive()]
            if gone:
                logger.error("API process %s exited (code %s): stopping the others", gone[0].name, gone[0].exitcode)
                status = 1
                break
        for worker in workers:  # each drains its requests, then stops its share of the engine
            if worker.is_alive():
                worker.terminate()  # SIGTERM: uvicorn's graceful shutdown
        for worker in workers:
            reap(worker, args.shutdown_timeout + 15)
            if worker.exitcode not in (0, -signal.SIGTERM) and status == 0:
                status = 1
    finally:
        stop_cores()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status


def _api_process(args: argparse.Namespace, links, metrics_dir: str, supervisor_pid: int) -> None:
    """One of --api-server-count's HTTP processes: the app over its own pipes to each engine core
    (`links`: (pipes, info) per core), on its own listening socket of the shared port."""
    import signal
    import threading

    from engine.config import LOG_FORMAT, engine_config_from_args
    from engine.data_parallel import engine_client

    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)

    def drain_if_orphaned() -> None:  # the supervisor was killed outright: do not serve on alone
        while os.getppid() == supervisor_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=drain_if_orphaned, name="roseinfer-supervisor-watch", daemon=True).start()
    core = engine_client(engine_config_from_args(args), links)
    app = build_server_app(args, core, metrics_dir)
    sock = _port_socket(args.host, args.port)
    sock.listen(2048)
    _run_uvicorn(app, args, sockets=[sock])


def _port_socket(host: str, port: int):
    """A socket bound to host:port that other processes of this user can bind too (SO_REUSEPORT)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _graceful_server_class():
    import contextlib
    import signal

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its graceful shutdown, so the process dies of the
        signal; a clean drain should exit 0, so handle the signals without re-raising."""

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return GracefulServer


def _GracefulServer(config):  # noqa: N802 - a class factory, imported lazily with uvicorn
    return _graceful_server_class()(config)
