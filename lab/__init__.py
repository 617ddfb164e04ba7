"""The lab: real Consul, HAProxy and renderer processes, for the demos, the tests and the bench.

Not part of the installed package (the wheel ships the product, `renderer`); it runs from a
checkout, found as the directory this package sits in.

- `processes`: a child process with its log, stopped by PID; a Consul dev agent; HAProxy in
  master-worker mode; finding the Consul binary.
- `webapp`: the demo web app (stdlib only; the compose stack's image carries it as one file).
- `stack`: HAProxy plus the renderer on a Consul agent (demo, tests, bench).
- `servers`: HAProxy's own server list (`show servers state`), sampled by a process of its own.
- `demo`: `make demo`, everything on loopback.
- `netns`, `cluster`, `load`, `observe`: hosts as network namespaces, the production topology
  on them, the client host's load and what is measured; `cluster_demo` is `make demo-cluster`.
"""

from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
"""The checkout the lab runs from (templates, `.run/`, `.tools/`)."""
