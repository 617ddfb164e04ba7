"""consul-renderer: keep HAProxy's configuration in step with a Consul service catalog.

The package reads top-down along the data flow:
consul_client → dependency → batch, watch (a connection budget: blocking queries, catalog-wide triggers,
sweeps) → template → install (runtime first, the file written behind it) → write (stage, validate,
swap) → haproxy / runtime / apply → runner.
"""

__version__ = "0.1.0"
