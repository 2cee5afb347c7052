"""A flash sale of simulated fans against a running mesh, through the REST edge only.

`make demo` (python -m flashsale) runs one against `make up`'s stack and prints a report;
`make bench` reuses :func:`flashsale.sale.run` for its purchases-per-minute figure.
"""
