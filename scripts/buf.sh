#!/usr/bin/env bash
# Lint Ticketping's protobuf contracts and check them for breaking changes, offline.
#
#   scripts/buf.sh lint       buf lint (buf.yaml: STANDARD) on our files of gen/descriptor.binpb
#   scripts/buf.sh breaking   buf breaking (FILE rules): the working tree's protos against the
#                             protos/ tree of the commit AGAINST_REF (default: main)
#
# buf comes from npm (@bufbuild/buf, pinned below) into .cache/npm. Both commands feed buf
# FileDescriptorSets built by grpc_tools.protoc as images, so buf never resolves modules and never
# contacts the BSR. Environment: AGAINST_REF (breaking), BUF (use this buf binary instead).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BUF_VERSION="1.75.0"
NPM_PREFIX="$ROOT/.cache/npm"
BUF="${BUF:-$NPM_PREFIX/node_modules/.bin/buf}"
PY="$ROOT/.venv/bin/python"
DESCRIPTOR="$ROOT/gen/descriptor.binpb"
# buf's own cache stays in the repo's ignored .cache/, not in $HOME.
export BUF_CACHE_DIR="${BUF_CACHE_DIR:-$ROOT/.cache/buf}"

log() { printf 'buf.sh: %s\n' "$*" >&2; }

ensure_buf() {
  if [[ -x "$BUF" ]] && [[ "$("$BUF" --version 2>/dev/null)" == "$BUF_VERSION" ]]; then
    return
  fi
  command -v npm >/dev/null || { log "npm is needed to install buf"; exit 1; }
  log "installing @bufbuild/buf@$BUF_VERSION into .cache/npm"
  mkdir -p "$NPM_PREFIX"
  npm install --prefix "$NPM_PREFIX" --no-audit --no-fund --loglevel=error \
    "@bufbuild/buf@$BUF_VERSION" >&2
  BUF="$NPM_PREFIX/node_modules/.bin/buf"
  [[ -x "$BUF" ]] || { log "buf did not install to $BUF"; exit 1; }
}

# Rebuild gen/ when the descriptor set is missing or older than any .proto or protos/ folder
# (a folder's mtime changes when a file is added or removed).
ensure_descriptor() {
  if [[ ! -s "$DESCRIPTOR" ]] \
    || [[ -n "$(find protos \( -name '*.proto' -o -type d \) -newer "$DESCRIPTOR" -print -quit)" ]]; then
    log "protos changed: running scripts/gen_protos.py"
    "$PY" scripts/gen_protos.py >&2
  fi
}

# build_descriptor_set <protos dir> <output .binpb>: same include paths as scripts/gen_protos.py,
# but with <protos dir> in place of the working tree's protos/.
build_descriptor_set() {
  "$PY" - "$1" "$2" <<'PYTHON'
import sys
from pathlib import Path

sys.path.insert(0, "scripts")
import gen_protos  # noqa: E402  (its include paths: protos/, well-known types, googleapis)
from grpc_tools import protoc  # noqa: E402

src, out = Path(sys.argv[1]).resolve(), sys.argv[2]
includes = [str(src)] + [p for p in gen_protos.include_paths() if Path(p) != gen_protos.PROTOS]
files = sorted(str(p.relative_to(src)) for p in src.rglob("*.proto"))
if not files:
    sys.exit(f"no .proto files under {src}")
args = ["grpc_tools.protoc", *(f"-I{p}" for p in includes), f"--descriptor_set_out={out}",
        "--include_imports", "--include_source_info", *files]
sys.exit(protoc.main(args))
PYTHON
}

cmd_lint() {
  ensure_buf
  ensure_descriptor
  "$BUF" lint "$DESCRIPTOR" --config buf.yaml --exclude-path google
  log "lint OK"
}

has_commit() { git rev-parse --verify --quiet "${1}^{commit}" >/dev/null; }

cmd_breaking() {
  local ref="${AGAINST_REF:-main}"
  if ! has_commit "$ref"; then
    if [[ -n "${AGAINST_REF:-}" ]]; then
      # An explicit ref that does not resolve is a mistake, not "nothing to compare".
      log "AGAINST_REF='$AGAINST_REF' is not a commit"
      exit 2
    elif has_commit origin/main; then
      ref="origin/main"  # e.g. a CI clone without a local main branch
    else
      echo "buf.sh breaking: 'main' has no commit yet; nothing to compare against, skipping."
      exit 0
    fi
  fi
  if ! git cat-file -e "${ref}:protos" 2>/dev/null; then
    echo "buf.sh breaking: '$ref' has no protos/ tree yet; nothing to compare against, skipping."
    exit 0
  fi
  ensure_buf
  ensure_descriptor

  local tmp
  tmp="$(mktemp -d)"
  # shellcheck disable=SC2064  # expand $tmp now
  trap "rm -rf '$tmp'" EXIT
  git archive --format=tar "$ref" protos | tar -x -C "$tmp"
  build_descriptor_set "$tmp/protos" "$tmp/against.binpb"

  log "comparing the working tree's protos with $ref ($(git rev-parse --short "$ref"))"
  "$BUF" breaking "$DESCRIPTOR" --against "$tmp/against.binpb" --config buf.yaml \
    --exclude-path google
  log "breaking OK"
}

case "${1:-}" in
  lint) cmd_lint ;;
  breaking) cmd_breaking ;;
  *)
    echo "usage: $0 lint|breaking" >&2
    exit 2
    ;;
esac
