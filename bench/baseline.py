"""A second Envoy that answers a fixed body itself (direct_response): the ceiling of the edge.

Same binary, same machine, same run as the figure it is compared with; only the work behind the
edge (transcoding, a gRPC call, Python) differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import yaml

from devstack.components import another_envoy
from devstack.layout import Layout

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def config(port: int, admin_port: int, bodies: dict[str, tuple[str, str]]) -> dict:
    """bodies: path -> (content type, body), each answered by Envoy itself with 200."""
    routes = [{"match": {"path": path},
               "direct_response": {"status": 200, "body": {"inline_string": body}},
               "response_headers_to_add": [{"header": {"key": "content-type", "value": ctype},
                                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}
              for path, (ctype, body) in bodies.items()]
    hcm = {"@type": _HCM, "stat_prefix": "baseline", "codec_type": "AUTO",
           "route_config": {"virtual_hosts": [{"name": "b", "domains": ["*"], "routes": routes}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [{
            "name": "baseline",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}],
        }]},
    }


@contextlib.contextmanager
def direct_envoy(lay: Layout, bodies: dict[str, tuple[str, str]]) -> Iterator[str]:
    """Run the baseline Envoy for the duration; yield its base URL."""
    port, admin_port = lay.edge_port + 90, lay.envoy_admin_port + 90
    path = lay.run_dir / "bench" / "baseline-envoy.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config(port, admin_port, bodies)))
    with another_envoy(lay, "envoy-baseline", path, admin_port):
        yield f"http://127.0.0.1:{port}"
