"""`roseinfer generate` as a user runs it."""

import subprocess
import sys


def test_generate_prints_prompt_and_completion(tiny_llama_dir):
    cmd = [sys.executable, "-m", "server.cli", "generate", "--model", tiny_llama_dir, "--prompt", "Hello there",
           "--max-tokens", "8", "--ignore-eos", "--kv-cache-memory", "0.01"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Hello there") and len(res.stdout.strip()) > len("Hello there")
    assert "8 tokens" in res.stderr


def test_generate_reports_unknown_model_cleanly():
    res = subprocess.run([sys.executable, "-m", "server.cli", "generate", "--model", "nope", "--prompt", "x"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "not found" in res.stderr and "Traceback" not in res.stderr


def test_dummy_gpt2_runs_without_weights():
    cmd = [sys.executable, "-m", "server.cli", "generate", "--model", "gpt2", "--load-format", "dummy",
           "--prompt", "Hello world", "--max-tokens", "4", "--ignore-eos", "--kv-cache-memory", "0.02"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "RANDOM weights" in res.stderr


def test_api_server_count_default_follows_the_device(monkeypatch):
    """One API process on the CPU (the engine needs the cores) or with the engine in-process; on a
    GPU a quarter of the cores, at most 4; an explicit count always wins."""
    import argparse

    import engine.model_runner as model_runner
    from server.serve_cli import default_api_server_count

    def args(device="auto", count=None, one_process=False):
        return argparse.Namespace(device=device, api_server_count=count, no_engine_process=one_process)

    monkeypatch.setattr(model_runner.torch.cuda, "is_available", lambda: False)
    assert default_api_server_count(args()) == 1
    assert default_api_server_count(args("cuda")) == 1  # no GPU: the engine reports the bad --device
    assert default_api_server_count(args(count=3)) == 3
    monkeypatch.setattr(model_runner.torch.cuda, "is_available", lambda: True)
    for cores, expected in ((2, 1), (8, 2), (16, 4), (128, 4)):
        monkeypatch.setattr("os.cpu_count", lambda cores=cores: cores)
        assert default_api_server_count(args()) == expected
    assert default_api_server_count(args("cpu")) == 1
    assert default_api_server_count(args(one_process=True)) == 1


def test_serve_refuses_api_processes_without_an_engine_process(tiny_llama_dir):
    res = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", tiny_llama_dir, "--no-engine-process",
                          "--api-server-count", "2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "--api-server-count needs the engine in its own process" in res.stderr


def test_serve_with_api_processes_reports_a_bad_model_cleanly():
    res = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", "nope", "--api-server-count", "2"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "not found" in res.stderr and "Traceback" not in res.stderr
