"""`make gen`: build the Python stubs (an installable package with type stubs) and the descriptor set.

Output (build output, never hand-edited, ignored by git):
  gen/python/           the `ticketping-contracts` package: *_pb2.py, *_pb2.pyi, *_pb2_grpc.py(i)
  gen/descriptor.binpb  a FileDescriptorSet with imports, for Envoy's transcoder and buf
"""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"
PY_OUT = GEN / "python"
DESCRIPTOR = GEN / "descriptor.binpb"
BIN = Path(sys.executable).parent

EXTRA_DESCRIPTORS = ["google/rpc/error_details.proto", "google/rpc/status.proto"]

PACKAGE_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "ticketping-contracts"
version = "0.1.0"
description = "Generated Python stubs of Ticketping's protobuf contracts (gRPC services and events)."
requires-python = ">=3.11"
dependencies = ["grpcio>=1.85", "protobuf>=6.31", "googleapis-common-protos>=1.70"]

[tool.setuptools.packages.find]
include = ["ticketping*"]

[tool.setuptools.package-data]
"*" = ["*.pyi", "py.typed"]
"""


def include_paths() -> list[str]:
    """protos/, protobuf's well-known types, and googleapis' (google/api, google/rpc, google/type)."""
    wkt = resources.files("grpc_tools") / "_proto"
    import google.api.annotations_pb2 as ann  # ships annotations.proto beside it

    googleapis = Path(ann.__file__).resolve().parent.parent.parent
    return [str(PROTOS), str(wkt), str(googleapis)]


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))


def run_protoc(args: list[str]) -> None:
    cmd = ["grpc_tools.protoc", *(f"-I{p}" for p in include_paths()), *args]
    code = protoc.main(cmd)
    if code != 0:
        raise SystemExit(f"protoc failed ({code}): {' '.join(args[:3])} ...")


def main() -> None:
    files = proto_files()
    if not files:
        raise SystemExit("no .proto files under protos/")
    shutil.rmtree(PY_OUT, ignore_errors=True)
    PY_OUT.mkdir(parents=True)
    run_protoc([
        f"--python_out={PY_OUT}",
        f"--pyi_out={PY_OUT}",
        f"--grpc_python_out={PY_OUT}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--mypy_grpc_out={PY_OUT}",
        *files,
    ])
    # The transcoder renders error details (google.rpc.ErrorInfo) as JSON only if their
    # descriptors are in the set, so they go in beside our own files.
    run_protoc([f"--descriptor_set_out={DESCRIPTOR}", "--include_imports",
                "--include_source_info", *files, *EXTRA_DESCRIPTORS])
    # Regular packages (with __init__.py) so the wheel installs cleanly and mypy sees py.typed.
    for d in [p for p in PY_OUT.rglob("*") if p.is_dir()]:
        (d / "__init__.py").touch()
    (PY_OUT / "ticketping" / "py.typed").touch()
    (PY_OUT / "pyproject.toml").write_text(PACKAGE_PYPROJECT)
    print(f"gen: {len(files)} protos -> {PY_OUT.relative_to(ROOT)}, {DESCRIPTOR.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
