"""devstack's logs are appended to across restarts, and set aside at a start once large."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from devstack import components
from devstack.layout import layout
from devstack.proc import ProcSpec, log_path, rotate_if_large, spawn


def test_a_large_log_is_set_aside_with_one_older_copy(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    assert not rotate_if_large(log, limit=10)  # none yet
    log.write_text("short")
    assert not rotate_if_large(log, limit=10) and log.read_text() == "short"
    log.write_text("first long log")
    assert rotate_if_large(log, limit=10)
    assert not log.exists() and (tmp_path / "svc.log.1").read_text() == "first long log"
    log.write_text("second long log")
    assert rotate_if_large(log, limit=10)
    assert (tmp_path / "svc.log.1").read_text() == "second long log"  # only one older copy


def test_spawn_sets_a_large_log_aside_before_the_process_appends(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("devstack.proc.LOG_KEEP_BYTES", 10)
    log = log_path(tmp_path, "echoer")
    log.parent.mkdir(parents=True)
    log.write_text("an old run's long output\n")
    spawn(ProcSpec("echoer", ("/bin/sh", "-c", "echo new run"), cwd=tmp_path), tmp_path)
    deadline = time.monotonic() + 10
    while "new run" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "new run" in log.read_text() and "old run" not in log.read_text()
    assert (log.parent / "echoer.log.1").read_text() == "an old run's long output\n"


def test_the_edges_access_logs_are_set_aside_before_envoy_starts(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    lay = layout("test")
    monkeypatch.setattr(type(lay), "logs_dir", property(lambda self: tmp_path))
    monkeypatch.setattr("devstack.proc.LOG_KEEP_BYTES", 10)
    rendered: list[Path] = []
    monkeypatch.setattr(components, "render_envoy_config", lambda _lay, path: rendered.append(path))
    (tmp_path / "edge-access.log").write_text("many requests\n")
    (tmp_path / "edge_core-access.log").write_text("few\n")
    components._prepare_envoy(lay)
    assert (tmp_path / "edge-access.log.1").exists() and not (tmp_path / "edge-access.log").exists()
    assert (tmp_path / "edge_core-access.log").read_text() == "few\n"
    assert rendered
