"""The edge: Envoy's configuration, generated from devstack's layout and the descriptor set."""
