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
