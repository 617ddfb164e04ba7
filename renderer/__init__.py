"""consul-renderer: keep HAProxy's configuration in step with a Consul service catalog.

The package reads top-down along the data flow:
consul_client → dependency → watch → template → write (stage, validate, swap) → haproxy / apply → runner.
"""

__version__ = "0.1.0"
