"""A real roseinfer server (uvicorn in a subprocess on a free 127.0.0.1 port)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from load_tests.robustness import metric_value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: str, *extra: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "server.cli", "serve", "--model", model_dir, "--served-model-name", "tiny",
               "--port", str(self.port), "--kv-cache-memory", "0.002", "--max-model-len", "256", *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.proc.kill()
        tail = "".join(self.proc.stdout.readlines()[-40:])  # what it was doing: a hung start says why here
        raise RuntimeError(f"server did not become healthy in 120 s; its last output:\n{tail}")

    def stop(self) -> int:
        """SIGTERM and wait: a graceful shutdown exits 0."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


SERVE_MODES = {"engine-process": ("--api-server-count", "1"), "one-process": ("--no-engine-process",),
               "two-api-processes": ("--api-server-count", "2")}


@pytest.fixture(scope="module", params=list(SERVE_MODES))
def server(request, tiny_llama_dir):
    """`roseinfer serve` every way: the engine in its own process (the default), in the server's,
    and shared by two API processes on one port."""
    srv = ServerProcess(tiny_llama_dir, *SERVE_MODES[request.param])
    yield srv
    assert srv.stop() == 0


def gauge(base_url: str, name: str) -> float:
    value = metric_value(base_url, name)
    if value is None:
        raise KeyError(name)
    return value


def wait_for_gauge(base_url: str, name: str, value: float, timeout_s: float = 20.0) -> float:
    deadline = time.monotonic() + timeout_s
    current = gauge(base_url, name)
    while current != value and time.monotonic() < deadline:
        time.sleep(0.05)
        current = gauge(base_url, name)
    return current
