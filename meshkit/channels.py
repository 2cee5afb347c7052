"""gRPC channels from one service to another.

A target is ``host:port`` (or any gRPC target, e.g. ``dns:///queue:50051``). On Kubernetes the
services' Services are headless (k8s/), so the name resolves to every ready replica's address;
with gRPC's default pick_first a replica would send all its calls to the first of them for as
long as the connection lived. round_robin spreads the calls over every address the name resolves
to, and is the same as pick_first where there is one (a local stack).

The servers end connections after ``TP_GRPC_MAX_CONNECTION_AGE_SECONDS`` (meshkit.server), so
clients resolve the name again and find replicas added since.
"""

from __future__ import annotations

import json

import grpc

SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def client_channel(target: str) -> grpc.aio.Channel:
    """An insecure channel (the mesh runs inside one network; see k8s/ NetworkPolicies) that
    balances calls over every address the target resolves to."""
    return grpc.aio.insecure_channel(target, options=[("grpc.service_config", SERVICE_CONFIG)])
