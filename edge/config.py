"""Generate Envoy's configuration for one layout (``python -m edge.config [--profile] [-o file]``).

One public port serves REST/JSON (``grpc_json_transcoder`` over the descriptor set built from
``protos/``) and native gRPC. Envoy's cache filter breaks when it and the transcoder both act on
one call (edge-notes.md), so each is turned off per route where the other works, and one Envoy
runs four listeners:

  edge (public)        cache → buffer → health_check → header_mutation → lua (FAILED_PRECONDITION
                       answers become 412, not the transcoder's 400; REST answers lose the
                       gRPC call's own grpc-* headers) → grpc_json_transcoder →
                       jwt_authn → rbac → router. GETs without a token (what a service marks
                       cacheable, for as long as it says) see only the cache and go on to
                       edge_fill on a miss, or to edge_core when they ask for a fresh answer;
                       everything else (a token, a write, native gRPC, health) sees everything
                       but the cache and goes straight to the services, in one hop (a second hop
                       cost Envoy about a millisecond per purchase). The HCM appends the
                       client's address to x-forwarded-for (use_remote_address): services trust
                       its LAST entry. Client-sent ``x-user-*`` and ``x-admission-{sub,event,jti,iat}``
                       are dropped before the token checks set them.
  edge_fill (loopback) where the front's cache misses go: cache_v2 → router → edge_core. An
                       answer expires for every fan at once (the legacy cache counts age in
                       whole seconds from its Date), and that cache sends each miss upstream;
                       cache_v2 collapses all misses of one answer into ONE call to the core,
                       so a sale's pollers cost a service one call per answer per second, not
                       one per open connection.
  edge_core (loopback) the front's chain without the cache, for what the caches send on: the
                       same routes and checks, so a cached answer is the one a fan would get.
  edge_keys (loopback) the JWKS routes jwt_authn fetches, transcoded

The front's route table is not in envoy.yaml: Envoy reads it from routes/front.json beside it
(RDS from a file, reloaded when a new one is moved in). write_config() writes it as built here
(also kept as routes/base.json); edge/feed.py, running beside Envoy, adds the open waiting rooms'
status answers ahead of those routes, so Envoy answers a sale's status polls itself instead of
from its cache.

jwt_authn and rbac sit after the transcoder, so they see every call, REST or native gRPC, by its
gRPC path (``/pkg.Service/Method``): their rules come straight from each RPC's access level in
the contracts (``(ticketping.access.v1.access)``), with no REST path patterns to keep in step.
Their 401/403 answers pass back through the transcoder, which renders them as the JSON error.

User tokens are checked against identity's keys only (from edge_keys).

Each service is a cluster with gRPC health checks, circuit breakers with a retry budget and
outlier detection. The admin interface listens on loopback only.

Where it runs (:class:`Placement`): on one machine (devstack), every service is 127.0.0.1 at its
layout's port and access logs go under the run directory. In a cluster (``--cluster``, what the
edge's init container runs on Kubernetes, k8s/base/edge), each service is its Service's DNS name
(headless: Envoy resolves every ready replica and balances per request), Envoy listens on all
addresses, and access logs go to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import descriptor_pb2

from devstack.layout import DESCRIPTOR_SET, Layout, Service, layout
from meshkit import access

# Headers only the edge may set (from verified tokens); any client-sent copy is removed.
TRUSTED_HEADER_PREFIXES = ("x-user-",)
TRUSTED_HEADERS = access.ADMISSION_CLAIM_HEADERS
# Envoy's own health answers (all services, or one: /healthz/<service>).
HEALTH_PATH = "/healthz"
# gRPC health of one service through the edge: `grpc.health.v1.Health/Check` with this header.
SERVICE_HEADER = "x-tp-service"

_TYPES = "type.googleapis.com/envoy.extensions.filters"
# Request bodies larger than this are refused at the edge (413) before any service sees them.
MAX_REQUEST_BYTES = 256 * 1024
# The loopback listeners behind the public one, as clusters of the same Envoy.
CORE_CLUSTER = "edge_core"
KEYS_CLUSTER = "edge_keys"
# The front's cache misses go to this loopback listener (devstack's layout.edge_fill_port).
FILL_CLUSTER = "edge_fill"
# What a cache adds to revalidate a stale copy. The front's cache sends them on its misses; the
# fill cache would take such a request as uncacheable and pass every one through, so they are
# dropped there: the services never answer 304 anyway, a full 200 is always the answer.
CACHE_VALIDATORS = ("if-none-match", "if-modified-since")
# The transcoded gRPC call's own headers, meaningless to a REST client: dropped from what the
# front stores, as its cache sends every stored header again with every hit (these three cost
# a cached poll about 3% of its instructions, callgrind).
TRANSPORT_HEADERS = ("grpc-status", "grpc-message", "grpc-accept-encoding")
USER_JWKS_PATH = "/v1/internal/identity/jwks"
USER_JWKS_METHOD = "/ticketping.identity.v1.IdentityService/GetSigningKeys"
ADMISSION_JWKS_PATH = "/v1/internal/queue/jwks"
ADMISSION_JWKS_METHOD = "/ticketping.queue.v1.QueueService/GetAdmissionKeys"


# Envoy's own answers (no route, an upstream down, a body too large, later a bad token) get the
# same JSON error shape as the services' transcoded errors: {code, message, details[ErrorInfo]}.
# HTTP status -> (google.rpc.Code, ErrorInfo reason).
# A client's header block (URL included) beyond this is 431, in the API's error shape. The
# services take twice as much metadata (meshkit.server.MAX_METADATA_BYTES): the original path
# travels again in x-envoy-original-path.
MAX_REQUEST_HEADERS_KB = 16

LOCAL_REPLIES = {
    400: (3, "BAD_REQUEST"),
    401: (16, "UNAUTHENTICATED"),
    403: (7, "PERMISSION_DENIED"),
    404: (5, "ROUTE_NOT_FOUND"),
    413: (3, "BODY_TOO_LARGE"),
    431: (3, "HEADERS_TOO_LARGE"),
    429: (8, "RATE_LIMITED"),
    503: (14, "UPSTREAM_UNAVAILABLE"),
    504: (4, "UPSTREAM_TIMEOUT"),
}


def _error_format(code: int, reason: str) -> dict[str, Any]:
    return {
        "json_format": {
            "code": code,
            "message": "%LOCAL_REPLY_BODY%",
            "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                         "reason": reason, "domain": "ticketping.dev"}],
        },
        "content_type": "application/json",
    }


def _local_reply_config() -> dict[str, Any]:
    # jwt_authn answers 403 for a token that verifies but names another audience; to the app
    # every unusable token means "sign in again": 401.
    jwt_denied = {
        "filter": {"extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3."
                         "ExpressionFilter",
                "expression": "response.code == 403 && "
                              "response.code_details.startsWith('jwt_authn_access_denied')",
            },
        }},
        "status_code": 401,
        "body_format_override": _error_format(16, "UNAUTHENTICATED"),
    }
    def status(op: str, value: int) -> dict[str, Any]:
        return {"status_code_filter": {"comparison": {
            "op": op, "value": {"default_value": value, "runtime_key": f"lr_{op.lower()}_{value}"}}}}
    # Only errors take the error's shape: a format for every local reply (the old `body_format`)
    # gave health's 200 the body of an EDGE_ERROR.
    return {
        "mappers": [
            jwt_denied,
            *({"filter": status("EQ", code), "body_format_override": _error_format(grpc, reason)}
              for code, (grpc, reason) in LOCAL_REPLIES.items()),
            {"filter": status("GE", 400), "body_format_override": _error_format(2, "EDGE_ERROR")},
        ],
    }


def _not_found(message: str = "no such route") -> dict[str, Any]:
    return {"status": 404, "body": {"inline_string": message}}


# Envoy answers 503 when fewer than this percentage of a cluster's hosts are healthy (integer
# arithmetic: 100 * healthy < total * 1), so 1 means "at least one host", up to 100 replicas. The
# edge is ready when it can route to every service, not only when every replica is up: in a
# cluster each pod is a host, and 100 would take every edge pod out of its Service together as
# soon as one replica of any service failed a health check.
MIN_HEALTHY_PERCENT = 1.0


def _health_filter(path: str, services: list[Service]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.health_check",
        "typed_config": {
            "@type": f"{_TYPES}.http.health_check.v3.HealthCheck",
            "pass_through_mode": False,
            "headers": [{"name": ":path", "string_match": {"exact": path}}],
            "cluster_min_healthy_percentages": {
                s.name: {"value": MIN_HEALTHY_PERCENT} for s in services
            },
        },
    }


def _header_sanitizer() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": f"{_TYPES}.http.header_mutation.v3.HeaderMutation",
            "mutations": {
                "request_mutations": [
                    *({"remove_on_match": {"key_matcher": {"prefix": p}}}
                      for p in TRUSTED_HEADER_PREFIXES),
                    *({"remove_on_match": {"key_matcher": {"exact": h}}} for h in TRUSTED_HEADERS),
                ]
            },
        },
    }


# google.rpc's HTTP mapping, which the transcoder's convert_grpc_status follows, makes
# FAILED_PRECONDITION a 400, the same as a malformed request. The REST API says 412: "the request
# is fine, the resource is not in a state to take it" (a room not open yet, an order not payable,
# an event no longer a draft), which an app must tell from its own mistake. The transcoder drops
# grpc-status from what it converts, so its status JSON is read, on 400s only (the body is
# buffered for those alone; every other answer passes untouched).
# The same filter drops the transcoded call's own headers (TRANSPORT_HEADERS, which the
# transcoder merges from the gRPC answer into the REST one) from every answer that is not gRPC:
# meaningless to an app, and sent with every answer. Native gRPC answers keep them (a
# trailers-only error carries its status there).
_PRECONDITION_CODE = '{"code":9,'
_PRECONDITION_LUA = f"""
function envoy_on_response(handle)
  local headers = handle:headers()
  local kind = headers:get("content-type")
  if kind == nil or string.sub(kind, 1, 16) ~= "application/grpc" then
{"".join(f'    headers:remove("{h}")' + chr(10) for h in TRANSPORT_HEADERS)}  end
  if headers:get(":status") ~= "400" then return end
  local body = handle:body()  -- waits for the whole body: headers must be fetched again after
  if body ~= nil and body:length() >= {len(_PRECONDITION_CODE)}
      and body:getBytes(0, {len(_PRECONDITION_CODE)}) == '{_PRECONDITION_CODE}' then
    handle:headers():replace(":status", "412")
  end
end
"""


def _precondition_status() -> dict[str, Any]:
    """Before the transcoder in the chain, so it sees the transcoder's converted answers."""
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": f"{_TYPES}.http.lua.v3.Lua",
            "default_source_code": {"inline_string": _PRECONDITION_LUA},
        },
    }


def _transcoder(services: list[Service], descriptor: Path) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": {
            "@type": f"{_TYPES}.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            "proto_descriptor": str(descriptor),
            "services": [s.proto_service for s in services],
            "convert_grpc_status": True,
            "print_options": {
                "add_whitespace": False,
                "always_print_primitive_fields": True,
                "always_print_enums_as_ints": False,
                "preserve_proto_field_names": False,
            },
            # Unknown REST paths fall through to the router's JSON 404 (the transcoder's own
            # rejection would answer plain text).
            "request_validation_options": {"reject_unknown_method": False,
                                           "reject_binding_body_field_collisions": True},
            "ignore_unknown_query_parameters": True,
        },
    }


def access_levels(descriptor: Path = DESCRIPTOR_SET) -> dict[str, int]:
    """'/pkg.Service/Method' -> access level, read from the descriptor set."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor.read_bytes())
    return access.levels_of(fds.file)


def internal_methods(descriptor: Path = DESCRIPTOR_SET) -> list[str]:
    """Methods for other services only: the public edge answers them 404, REST and gRPC alike."""
    return sorted(m for m, lvl in access_levels(descriptor).items() if lvl == access.INTERNAL)


def _remote_jwks(lay: Layout, path: str) -> dict[str, Any]:
    return {
        "http_uri": {"uri": f"http://127.0.0.1:{lay.edge_keys_port}{path}",
                     "cluster": KEYS_CLUSTER, "timeout": "2s"},
        # Keys are published well before they sign (longer than this), so a cached JWKS
        # always knows the signing key.
        "cache_duration": "30s",
        "async_fetch": {"failed_refetch_duration": "1s"},
        "retry_policy": {"num_retries": 3, "retry_back_off": {
            "base_interval": "0.2s", "max_interval": "2s"}},
    }


# Verified tokens kept per worker, by token: a fan's app sends the same user token (and, once
# admitted, the same admission token) on every call, and an ES256 verification per request was
# a large share of the edge's CPU on booking routes (jwt_cache_miss == every request in a flash
# sale). The cache is per provider (a token cached as a user token is no admission token) and a
# cached token's time limits are checked again on every use; what a hit skips is the parse and
# the signature, so a key withdrawn from a JWKS keeps passing tokens already seen until they
# expire (user tokens live minutes; admission tokens end with the session, which booking checks
# with the waiting room anyway).
JWT_CACHE_SIZE = 10_000


def _jwt_authn(lay: Layout, descriptor: Path) -> dict[str, Any]:
    user = {"provider_name": "user"}
    admission = {"provider_name": "admission"}
    requires = {
        access.PUBLIC: {"requires_any": {"requirements": [user, {"allow_missing": {}}]}},
        access.USER: user,
        access.ADMIN: user,
        # Both tokens; that they name the same fan and this event is the service's check.
        access.ADMITTED: {"requires_all": {"requirements": [user, admission]}},
    }
    rules = [
        {"match": {"path": method}, "requires": requires[level]}
        for method, level in sorted(access_levels(descriptor).items())
        if level in requires
    ]
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": f"{_TYPES}.http.jwt_authn.v3.JwtAuthentication",
            "providers": {
                "user": {
                    "issuer": access.USER_TOKEN_ISSUER,
                    "audiences": [access.USER_TOKEN_AUDIENCE],
                    "remote_jwks": _remote_jwks(lay, USER_JWKS_PATH),
                    # Said outright: by default jwt_authn also takes ?access_token=, which puts a
                    # live token in URLs (access logs, the services' x-envoy-original-path) and
                    # past the front's "GETs without a token" routing.
                    "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
                    "jwt_cache_config": {"jwt_cache_size": JWT_CACHE_SIZE},
                    "forward": False,
                    "clock_skew_seconds": 30,
                    "claim_to_headers": [
                        {"header_name": access.USER_ID_HEADER, "claim_name": "sub"},
                        {"header_name": access.USER_ROLE_HEADER, "claim_name": "role"},
                    ],
                },
                # Only the waiting room's keys: a user token is no admission token, and back.
                "admission": {
                    "issuer": access.ADMISSION_TOKEN_ISSUER,
                    "audiences": [access.ADMISSION_TOKEN_AUDIENCE],
                    "remote_jwks": _remote_jwks(lay, ADMISSION_JWKS_PATH),
                    "from_headers": [{"name": access.ADMISSION_TOKEN_HEADER}],
                    "jwt_cache_config": {"jwt_cache_size": JWT_CACHE_SIZE},
                    "forward": False,
                    "clock_skew_seconds": 5,
                    "claim_to_headers": [
                        {"header_name": header, "claim_name": claim}
                        for header, claim in zip(access.ADMISSION_CLAIM_HEADERS,
                                                 ("sub", "event", "jti", "iat"), strict=True)
                    ],
                },
            },
            "rules": rules,
        },
    }


def _rbac(descriptor: Path) -> dict[str, Any]:
    admin_only = sorted(m for m, lvl in access_levels(descriptor).items() if lvl == access.ADMIN)
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": f"{_TYPES}.http.rbac.v3.RBAC",
            "rules": {"action": "DENY", "policies": {"admin-methods-need-admin-role": {
                "permissions": [{"or_rules": {"rules": [
                    {"url_path": {"path": {"exact": m}}} for m in admin_only]}}],
                "principals": [{"not_id": {"header": {
                    "name": access.USER_ROLE_HEADER,
                    "string_match": {"exact": access.ROLE_ADMIN}}}}],
            }}},
        },
    }


def _buffer() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.buffer",
        "typed_config": {"@type": f"{_TYPES}.http.buffer.v3.Buffer",
                         "max_request_bytes": MAX_REQUEST_BYTES},
    }


# Methods that hold the call until something happens (long polls), and how long the edge lets
# them run: their service's own limit and a margin (svc_booking/server.py WAIT_MAX). The other
# routes' 15 s, and their retries' 5 s per try, would cut them off.
LONG_POLLS = {"/ticketping.booking.v1.BookingService/WaitOrder": "35s"}


def _routes(lay: Layout, descriptor: Path) -> list[dict[str, Any]]:
    retry = {
        "retry_on": "connect-failure,refused-stream,unavailable",
        "num_retries": 2,
        "per_try_timeout": "5s",
        "retry_back_off": {"base_interval": "0.05s", "max_interval": "0.5s"},
    }
    routes: list[dict[str, Any]] = [
        {"match": {"path": path},
         "direct_response": _not_found()}
        for path in internal_methods(descriptor)
    ]
    for s in lay.services:
        # Health of one service, e.g. for internal teams: Health/Check with x-tp-service: catalog.
        routes.append({
            "match": {
                "prefix": "/grpc.health.v1.Health/",
                "headers": [{"name": SERVICE_HEADER, "string_match": {"exact": s.name}}],
            },
            "route": {"cluster": s.name, "timeout": "2s"},
        })
    private = [{"header": {"key": "cache-control", "value": PRIVATE_ANSWER},
                "append_action": "ADD_IF_ABSENT"}]
    by_proto = {s.proto_service: s for s in lay.services}
    for path, timeout in LONG_POLLS.items():
        routes.append({
            "match": {"path": path},
            "route": {"cluster": by_proto[path.split("/")[1]].name, "timeout": timeout,
                      "retry_policy": {k: v for k, v in retry.items() if k != "per_try_timeout"}},
            "response_headers_to_add": private,
        })
    for s in lay.services:
        # REST calls are transcoded first, so they match here by their gRPC path too.
        routes.append({
            "match": {"prefix": f"/{s.proto_service}/"},
            "route": {"cluster": s.name, "timeout": "15s", "retry_policy": retry},
            "response_headers_to_add": private,
        })
    routes.append({
        "match": {"prefix": "/"},
        "direct_response": _not_found(),
    })
    return routes


@dataclass(frozen=True)
class Placement:
    """Where the edge and the services it routes to run (the module's docstring)."""

    host: str = "127.0.0.1"  # the public listener's address
    # The services' addresses: None, 127.0.0.1 (STATIC); else a DNS name, e.g. "{name}" or
    # "{name}.ticketping.svc.cluster.local", resolved again and again (Envoy's DNS cluster).
    service_host: str | None = None
    stdout_logs: bool = False  # access logs on stdout (a container) instead of the run directory


LOCAL = Placement()
# Kubernetes: k8s/base/services names each Service after its service, all on CLUSTER_GRPC_PORT.
CLUSTER = Placement(host="0.0.0.0", service_host="{name}", stdout_logs=True)
CLUSTER_GRPC_PORT = 50051


def cluster_layout(lay: Layout) -> Layout:
    """The layout as seen from the edge's pod: every service on CLUSTER_GRPC_PORT of its own name."""
    return dataclasses.replace(
        lay, services=tuple(dataclasses.replace(s, grpc_port=CLUSTER_GRPC_PORT) for s in lay.services))


def _cluster(s: Service, placement: Placement) -> dict[str, Any]:
    address = "127.0.0.1" if placement.service_host is None else placement.service_host.format(name=s.name)
    discovery: dict[str, Any] = (
        {"type": "STATIC"} if placement.service_host is None
        # Pods come and go: every address the name has, resolved again every few seconds, IPv4
        # first (a cluster's usual Service family). The DNS extension, not Cluster's own
        # dns_* fields, which Envoy 1.40 deprecates.
        else {"cluster_type": {"name": "envoy.clusters.dns", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.clusters.dns.v3.DnsCluster",
            "dns_refresh_rate": "5s", "dns_lookup_family": "V4_PREFERRED"}}})
    return {
        "name": s.name,
        **discovery,
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": s.name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": address, "port_value": s.grpc_port}
            }}}]}],
        },
        "health_checks": [{
            "timeout": "1s",
            "interval": "2s",
            "no_traffic_interval": "2s",
            "unhealthy_threshold": 2,
            "healthy_threshold": 1,
            "grpc_health_check": {"service_name": s.proto_service},
        }],
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT",
            "max_connections": 1024,
            "max_pending_requests": 4096,
            "max_requests": 4096,
            "retry_budget": {"budget_percent": {"value": 20.0}, "min_retry_concurrency": 3},
        }]},
        "outlier_detection": {
            "consecutive_5xx": 5,
            "consecutive_gateway_failure": 5,
            "interval": "5s",
            "base_ejection_time": "10s",
            "max_ejection_percent": 50,
        },
    }


def _router() -> dict[str, Any]:
    # No x-envoy-* headers of the router's own: x-envoy-upstream-service-time told every fan
    # how long a service took (and rode along in every cached answer, replayed on each hit), and
    # x-envoy-expected-rq-timeout-ms is nothing the services read (gRPC has its deadline).
    # The caches fetch what they store through an internal client whose router is Envoy's own,
    # not this one: public GETs still carry the timing of the front's hop to edge_fill (removing
    # it there would take a filter in front of the cache, on every cached hit).
    return {"name": "envoy.filters.http.router",
            "typed_config": {"@type": f"{_TYPES}.http.router.v3.Router",
                             "suppress_envoy_headers": True}}


def _hcm(stat_prefix: str, routes: list[dict[str, Any]], filters: list[dict[str, Any]],
         logs: Path | None) -> dict[str, Any]:
    """logs: the directory of the access logs, one file per listener; None: stdout."""
    return {
        "@type": f"{_TYPES}.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "generate_request_id": True,
        "max_request_headers_kb": MAX_REQUEST_HEADERS_KB,
        "common_http_protocol_options": {"idle_timeout": "60s"},
        "http2_protocol_options": {"max_concurrent_streams": 1024},
        "access_log": [{
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(logs / f"{stat_prefix}-access.log") if logs else "/dev/stdout",
                "log_format": {"json_format": {
                    "ts": "%START_TIME%", "method": "%REQ(:METHOD)%",
                    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%", "status": "%RESPONSE_CODE%",
                    "grpc_status": "%GRPC_STATUS%", "upstream": "%UPSTREAM_CLUSTER%",
                    "ms": "%DURATION%", "request_id": "%REQ(X-REQUEST-ID)%",
                    "flags": "%RESPONSE_FLAGS%", "details": "%RESPONSE_CODE_DETAILS%",
                }},
            },
        }],
        "local_reply_config": _local_reply_config(),
        "route_config": {
            "name": stat_prefix,
            "virtual_hosts": [{"name": stat_prefix, "domains": ["*"], "routes": routes}],
        },
        "http_filters": filters,
    }


def _listener(name: str, host: str, port: int, hcm: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "address": {"socket_address": {"address": host, "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


def _keys_listener(lay: Layout, descriptor: Path, logs: Path | None) -> dict[str, Any]:
    """Loopback only: the key routes jwt_authn fetches (nothing else is routed here)."""
    identity, queue = lay.service("identity"), lay.service("queue")
    routes = [
        {"match": {"path": USER_JWKS_METHOD}, "route": {"cluster": identity.name, "timeout": "2s"}},
        {"match": {"path": ADMISSION_JWKS_METHOD}, "route": {"cluster": queue.name, "timeout": "2s"}},
        {"match": {"prefix": "/"}, "direct_response": _not_found()},
    ]
    filters = [_transcoder([identity, queue], descriptor), _router()]
    return _listener(KEYS_CLUSTER, "127.0.0.1", lay.edge_keys_port,
                     _hcm(KEYS_CLUSTER, routes, filters, logs))


# What the edge says of an answer whose service did not say whether it may be stored: a fan's
# hold, order, payment or ticket is nobody else's. A service marks only what may be shared
# (`public, max-age=N`); sending no-store itself was a gRPC batch of its own (initial metadata
# ahead of the answer), a tenth of a GetOrder's CPU in booking.
PRIVATE_ANSWER = "private, no-store"


def _core_filters(lay: Layout, descriptor: Path) -> list[dict[str, Any]]:
    """What a call that is not a cached poll goes through before the router: in the front for
    the calls answered in one hop, in the core for the front's cache misses."""
    services = list(lay.services)
    return [
        _buffer(),
        # Health answers come from here, never from a cache (they carry no cache-control).
        _health_filter(HEALTH_PATH, services),
        *(_health_filter(f"{HEALTH_PATH}/{s.name}", [s]) for s in services),
        _header_sanitizer(),
        _precondition_status(),
        _transcoder(services, descriptor),
        _jwt_authn(lay, descriptor),
        _rbac(descriptor),
    ]


def _core_listener(lay: Layout, descriptor: Path, logs: Path | None) -> dict[str, Any]:
    """Loopback only: transcoding, token checks and routing to the services, for the front's
    cache misses (through edge_fill) and the GETs that ask for a fresh answer to store."""
    filters = [*_core_filters(lay, descriptor), _router()]
    hcm = _hcm(CORE_CLUSTER, _routes(lay, descriptor), filters, logs)
    return _listener(CORE_CLUSTER, "127.0.0.1", lay.edge_inner_port, hcm)


def _cache() -> dict[str, Any]:
    """The front's cache: a hit costs less here than in cache_v2 (about 128k instructions
    against 144k per cached poll, callgrind), but every miss goes upstream on its own."""
    return {
        "name": "envoy.filters.http.cache",
        "typed_config": {
            "@type": f"{_TYPES}.http.cache.v3.CacheConfig",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.http.cache."
                                      "simple_http_cache.v3.SimpleHttpCacheConfig"},
        },
    }


def _collapsing_cache() -> dict[str, Any]:
    """cache_v2: one upstream request per stale answer, however many ask for it meanwhile."""
    return {
        "name": "envoy.filters.http.cache_v2",
        "typed_config": {
            "@type": f"{_TYPES}.http.cache_v2.v3.CacheV2Config",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.http.cache_v2."
                                      "simple_http_cache.v3.SimpleHttpCacheV2Config"},
        },
    }


def _fill_mutations() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": f"{_TYPES}.http.header_mutation.v3.HeaderMutation",
            "mutations": {
                "request_mutations": [{"remove": h} for h in CACHE_VALIDATORS],
                "response_mutations": [{"remove": h} for h in TRANSPORT_HEADERS],
            },
        },
    }


def fill_port(lay: Layout) -> int:
    return lay.edge_fill_port


def _fill_listener(lay: Layout, logs: Path | None) -> dict[str, Any]:
    """Loopback only: the front's cache misses, collapsed per answer into one call to the core."""
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": CORE_CLUSTER, "timeout": "20s"}}]
    # Only the router after the cache (cache_v2 sends its own upstream requests, past any
    # filter behind it).
    filters = [_fill_mutations(), _collapsing_cache(), _router()]
    hcm = _hcm(FILL_CLUSTER, routes, filters, logs)
    del hcm["access_log"]  # the core logs every call that reaches it
    hcm["generate_request_id"] = False  # and gives it an id
    return _listener(FILL_CLUSTER, "127.0.0.1", fill_port(lay), hcm)


def _off(names: list[str]) -> dict[str, Any]:
    """A route's typed_per_filter_config that turns these filters off on it."""
    off = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}
    return {name: off for name in names}


# A GET without a token or gRPC's content type: what the front's cache may answer.
_CACHEABLE: list[dict[str, Any]] = [
    {"name": ":method", "string_match": {"exact": "GET"}},
    {"name": "authorization", "present_match": False},
    {"name": "x-admission-token", "present_match": False},
    {"name": "content-type", "string_match": {"prefix": "application/grpc"},
     "invert_match": True, "treat_missing_header_as_empty": True},
]


def _collapsible() -> list[dict[str, Any]]:
    """A GET the cache may answer that does not ask for a fresh answer and is not health."""
    return [
        *_CACHEABLE,
        {"name": "cache-control", "present_match": False},
        {"name": ":path", "string_match": {"prefix": HEALTH_PATH}, "invert_match": True},
    ]


def _front_routes(core_routes: list[dict[str, Any]], core_filters: list[str]) -> list[dict[str, Any]]:
    """GETs without a token may be answered from the cache (the service's cache-control says
    whether and how long), behind which they are transcoded in the core; everything else is
    handled here in one hop, with the core's filters and routes and the cache off, so a token is
    always checked and nobody's private answer is ever stored. The cache's misses go through
    edge_fill, which collapses them, unless there is nothing to collapse: requests whose own
    cache-control asks for a fresh answer go to the core directly, and health is answered here.

    One chain holds both the cache and the transcoder, each turned off per route where the other
    works: edge-notes.md found the two breaking each other when both act on one call (503s), and
    a cached hit costs the same with the core's filters off in its chain (24.9-30.6 us against
    23.6-29.9 us with the cache and router alone, 4 runs each alternated, Envoy alone on this
    machine)."""
    to_core = {"cluster": CORE_CLUSTER, "timeout": "20s",
               "retry_policy": {"retry_on": "connect-failure", "num_retries": 1}}
    # First, as nearly every request of a sale is a cached poll (each route tried costs a hit).
    # (edge/feed.py puts the open rooms' status routes ahead of it, with its matchers.)
    collapsible = _collapsible()
    cache_only = _off(core_filters)
    no_cache = _off(["envoy.filters.http.cache"])
    return [
        {"match": {"prefix": "/", "headers": collapsible},
         "route": {**to_core, "cluster": FILL_CLUSTER}, "typed_per_filter_config": cache_only},
        {"match": {"prefix": "/", "headers": [
            *_CACHEABLE, {"name": ":path", "string_match": {"prefix": HEALTH_PATH},
                          "invert_match": True}]},
         "route": to_core, "typed_per_filter_config": cache_only},
        *({**r, "typed_per_filter_config": no_cache} for r in core_routes),
    ]


def _logged_here() -> dict[str, Any]:
    """The front logs the calls it handles itself: those that fail any of _CACHEABLE's matchers
    (a token, a write, native gRPC); the core logs the rest that reach a service, and a cached
    poll is not logged at all (a JSON line per poll would cost a third of a sale's polls)."""
    def failing(matcher: dict[str, Any]) -> dict[str, Any]:
        flipped = {k: v for k, v in matcher.items() if k != "treat_missing_header_as_empty"}
        if "present_match" in flipped:
            flipped["present_match"] = not flipped["present_match"]
        else:
            flipped["invert_match"] = not flipped.get("invert_match", False)
        return {"header_filter": {"header": flipped}}
    return {"or_filter": {"filters": [failing(m) for m in _CACHEABLE]}}


def _loopback_cluster(name: str, port: int, *, http2: bool) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 4096}},
            }}
    return cluster


def build(lay: Layout, descriptor: Path = DESCRIPTOR_SET, placement: Placement = LOCAL) -> dict[str, Any]:
    services = list(lay.services)
    logs = None if placement.stdout_logs else lay.logs_dir
    # The front's hot path (a cached poll) is the cache and the router: the core's filters are
    # off on its route. The client's address is appended to x-forwarded-for by the HCM itself
    # (use_remote_address).
    core_filters = _core_filters(lay, descriptor)
    front = _hcm("edge", _front_routes(_routes(lay, descriptor), sorted({f["name"] for f in core_filters})),
                 [_cache(), *core_filters, _router()], logs)
    front["use_remote_address"] = True
    front["access_log"][0]["filter"] = _logged_here()
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": lay.envoy_admin_port}}},
        "static_resources": {
            "listeners": [_listener("edge", placement.host, lay.edge_port, front),
                          _fill_listener(lay, logs),
                          _core_listener(lay, descriptor, logs),
                          _keys_listener(lay, descriptor, logs)],
            "clusters": [*(_cluster(s, placement) for s in services),
                         _loopback_cluster(FILL_CLUSTER, fill_port(lay), http2=True),
                         _loopback_cluster(CORE_CLUSTER, lay.edge_inner_port, http2=True),
                         _loopback_cluster(KEYS_CLUSTER, lay.edge_keys_port, http2=False)],
        },
    }


# The front's route table, read by Envoy from a file (RDS) so that edge/feed.py can put the open
# rooms' status answers ahead of the routes built here: beside envoy.yaml, in ROUTES_DIR,
# BASE_ROUTES is what build() made and FRONT_ROUTES what Envoy reads (the feed's routes, then
# BASE_ROUTES'). Envoy watches the directory and reloads FRONT_ROUTES when a new one is moved in.
ROUTES_DIR = "routes"
BASE_ROUTES = "base.json"
FRONT_ROUTES = "front.json"
ROUTE_CONFIGURATION = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


def routes_dir(config_path: Path) -> Path:
    return config_path.parent / ROUTES_DIR


def front_from_file(bootstrap: dict[str, Any], routes: Path) -> dict[str, Any]:
    """Move the front listener's route table out of ``bootstrap`` into RDS from ``routes``;
    return the table (a RouteConfiguration)."""
    front = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    table = front.pop("route_config")
    front["rds"] = {"route_config_name": table["name"], "config_source": {
        "resource_api_version": "V3",
        "path_config_source": {"path": str(routes / FRONT_ROUTES),
                               "watched_directory": {"path": str(routes)}}}}
    bootstrap["node"] = {"id": "edge", "cluster": "edge"}  # required by any xDS, a file's too
    return {"@type": ROUTE_CONFIGURATION, **table}


def discovery_document(table: dict[str, Any]) -> str:
    """The file Envoy reads for RDS: one RouteConfiguration."""
    return json.dumps({"resources": [table]}, separators=(",", ":"), sort_keys=True)


def replace_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` by a move within its directory (what Envoy's watch sees)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fed_status_route(base: dict[str, Any], path: str, body: str, cache_control: str) -> dict[str, Any]:
    """A route answering ``path`` with ``body`` from Envoy itself, for the requests that
    fed_request_predicate() lets through to it: the front's first route's filters (the cached
    polls') off, and the cache off too (a direct_response in the cache's chain answers 404)."""
    first = base["virtual_hosts"][0]["routes"][0]
    return {
        "match": {"path": path},
        "direct_response": {"status": 200, "body": {"inline_string": body}},
        "response_headers_to_add": [
            {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for k, v in (("content-type", "application/json"), ("cache-control", cache_control))],
        "typed_per_filter_config": {**first["typed_per_filter_config"],
                                    **_off(["envoy.filters.http.cache"])},
    }


def fed_request_predicate() -> dict[str, Any]:
    """The requests the cache would answer (_collapsible: a GET without a token or gRPC's
    content type, not asking for a fresh answer) as a match tree's predicate (xds.type.matcher)."""
    def header(name: str, value_match: dict[str, Any]) -> dict[str, Any]:
        return {"single_predicate": {
            "input": {"name": name, "typed_config": {
                "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
                "header_name": name}},
            "value_match": value_match}}

    def one(m: dict[str, Any]) -> dict[str, Any]:
        if "present_match" in m:  # any value: an absent header gives the predicate no input
            p = header(m["name"], {"safe_regex": {"google_re2": {}, "regex": ".*"}})
            return p if m["present_match"] else {"not_matcher": p}
        p = header(m["name"], m["string_match"])
        return {"not_matcher": p} if m.get("invert_match") else p

    return {"and_matcher": {"predicate": [one(m) for m in _collapsible() if m["name"] != ":path"]}}


def write_config(lay: Layout, path: Path, descriptor: Path = DESCRIPTOR_SET,
                 placement: Placement = LOCAL) -> Path:
    """envoy.yaml at ``path``, and the front's routes in routes/ beside it (FRONT_ROUTES starts
    as BASE_ROUTES: until the feed writes, every poll goes the cache's way)."""
    if not descriptor.exists():
        raise FileNotFoundError(f"{descriptor} is missing: run `make gen` first")
    routes = routes_dir(path)
    routes.mkdir(parents=True, exist_ok=True)
    if not placement.stdout_logs:
        lay.logs_dir.mkdir(parents=True, exist_ok=True)
    bootstrap = build(lay, descriptor, placement)
    table = front_from_file(bootstrap, routes)
    replace_file(routes / BASE_ROUTES, json.dumps(table, sort_keys=True))
    replace_file(routes / FRONT_ROUTES, discovery_document(table))
    path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=None)
    ap.add_argument("--cluster", action="store_true",
                    help="for a pod on Kubernetes: services by DNS name on port "
                         f"{CLUSTER_GRPC_PORT}, listen on all addresses, access logs on stdout")
    ap.add_argument("-o", "--output", type=Path, default=None)
    args = ap.parse_args(argv)
    lay = layout(args.profile)
    if args.cluster:
        lay = cluster_layout(lay)
    out = args.output or lay.run_dir / "envoy.yaml"
    write_config(lay, out, placement=CLUSTER if args.cluster else LOCAL)
    print(out, file=sys.stderr)


if __name__ == "__main__":
    main()
