"""`python -m devstack install`: put every tool the local platform needs on this machine.

Idempotent and fast when everything is there (only file checks). What it may install:
  apt:   redis-server redis-tools postgresql wrk prometheus (and a JRE, Maven, npm if missing)
  Maven: Kafka 3.9.1 (kafka_2.13) + slf4j-reload4j into .cache/kafka/libs (devstack/kafka/pom.xml)
  npm:   @bufbuild/buf into .cache/npm
  Go:    kustomize (sigs.k8s.io/kustomize/kustomize/v5) into .cache/go/bin, for k8s/'s tests
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from devstack.layout import CACHE, ROOT
from devstack.proc import DevstackError, run_checked

KAFKA_POM = ROOT / "devstack" / "kafka" / "pom.xml"
KAFKA_LIBS = CACHE / "kafka" / "libs"
KAFKA_STAMP = KAFKA_LIBS / ".devstack-stamp"
NPM_PREFIX = CACHE / "npm"
BUF_VERSION = "1.75.0"
BUF_BIN = NPM_PREFIX / "node_modules" / ".bin" / "buf"
# v5.8 needs Go 1.27; this machine's Go is 1.26.
KUSTOMIZE_VERSION = "v5.7.1"
KUSTOMIZE_BIN = CACHE / "go" / "bin" / "kustomize"

# Debian package -> is it already here?  (binary on PATH, or a check of its own)
_APT: tuple[tuple[str, str], ...] = (
    ("redis-server", "redis-server"),
    ("redis-tools", "redis-cli"),
    ("postgresql", "<postgres>"),
    ("default-jre-headless", "java"),
    ("maven", "mvn"),
    ("npm", "npm"),
    ("wrk", "wrk"),  # make bench's load generator
    ("prometheus", "promtool"),  # checks and unit-tests monitoring/'s config and alerts
)


def postgres_bin_dir() -> Path | None:
    """/usr/lib/postgresql/<newest version>/bin, if a PostgreSQL server is installed."""
    dirs = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres")]
    if not dirs:
        return None
    return max(dirs, key=lambda d: [int(x) for x in d.parent.name.split(".") if x.isdigit()])


def _present(probe: str) -> bool:
    if probe == "<postgres>":
        return postgres_bin_dir() is not None and shutil.which("psql") is not None
    return shutil.which(probe) is not None


def _ensure_apt() -> list[str]:
    missing = [pkg for pkg, probe in _APT if not _present(probe)]
    if not missing:
        return []
    if os.geteuid() != 0:
        raise DevstackError(f"missing Debian packages {' '.join(missing)}: install them as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run_checked(["apt-get", "update", "-q"], "apt-get update", env=env)
    run_checked(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
         "apt-get install", env=env)
    return [f"apt: {pkg}" for pkg in missing]


def _pom_digest() -> str:
    return hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()


def kafka_installed() -> bool:
    return KAFKA_STAMP.is_file() and KAFKA_STAMP.read_text().strip() == _pom_digest()


def _ensure_kafka() -> list[str]:
    if kafka_installed():
        return []
    tmp = KAFKA_LIBS.with_name("libs.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    run_checked(["mvn", "-q", "-B", "-f", str(KAFKA_POM), "dependency:copy-dependencies",
          f"-DoutputDirectory={tmp}"], "Maven (Kafka jars)")
    if not list(tmp.glob("kafka_2.13-*.jar")):
        raise DevstackError(f"Maven finished but left no kafka_2.13 jar in {tmp}")
    (tmp / KAFKA_STAMP.name).write_text(_pom_digest() + "\n")
    shutil.rmtree(KAFKA_LIBS, ignore_errors=True)
    tmp.replace(KAFKA_LIBS)
    return [f"maven: Kafka jars ({len(list(KAFKA_LIBS.glob('*.jar')))}) -> {KAFKA_LIBS}"]


def buf_installed() -> bool:
    manifest = NPM_PREFIX / "node_modules" / "@bufbuild" / "buf" / "package.json"
    try:
        version = json.loads(manifest.read_text()).get("version")
    except (FileNotFoundError, ValueError):
        return False
    return version == BUF_VERSION and BUF_BIN.exists()


def _ensure_buf() -> list[str]:
    if buf_installed():
        return []
    NPM_PREFIX.mkdir(parents=True, exist_ok=True)
    run_checked(["npm", "install", "--prefix", str(NPM_PREFIX), "--no-audit", "--no-fund",
          f"@bufbuild/buf@{BUF_VERSION}"], "npm install @bufbuild/buf")
    run_checked([str(BUF_BIN), "--version"], "buf --version")
    return [f"npm: @bufbuild/buf {BUF_VERSION} -> {BUF_BIN}"]


def kustomize_installed() -> bool:
    if not KUSTOMIZE_BIN.exists():
        return False
    out = run_checked([str(KUSTOMIZE_BIN), "version"], "kustomize version")
    return out.strip() == KUSTOMIZE_VERSION


def _ensure_kustomize() -> list[str]:
    if kustomize_installed():
        return []
    if shutil.which("go") is None:
        raise DevstackError("k8s/'s tests build its overlays with kustomize, which is installed with "
                            "`go install` from the Go module proxy: Go is not on PATH")
    env = {**os.environ, "GOBIN": str(KUSTOMIZE_BIN.parent), "GOFLAGS": "-modcacherw"}
    run_checked(["go", "install", f"sigs.k8s.io/kustomize/kustomize/v5@{KUSTOMIZE_VERSION}"],
                "go install kustomize", env=env)
    if not kustomize_installed():
        raise DevstackError(f"go install left no kustomize {KUSTOMIZE_VERSION} at {KUSTOMIZE_BIN}")
    return [f"go: kustomize {KUSTOMIZE_VERSION} -> {KUSTOMIZE_BIN}"]


def ensure_installed(verbose: bool = True) -> list[str]:
    """Install whatever is missing; return (and print) one line per thing installed."""
    done = [*_ensure_apt(), *_ensure_kafka(), *_ensure_buf(), *_ensure_kustomize()]
    if verbose:
        for line in done:
            print(f"installed {line}", flush=True)
    return done
