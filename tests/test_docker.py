"""docker/ cannot be built here (no Docker engine): lint the Dockerfile and check the compose file."""

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    res = subprocess.run([hadolint, str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert "HEALTHCHECK" in text and "/health" in text and "USER 1000" in text


def test_compose_reserves_a_gpu_and_mounts_models():
    svc = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]["roseinfer"]
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert any(v.endswith(":/models:ro") for v in svc["volumes"])
