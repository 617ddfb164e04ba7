"""A lab of hosts on one machine (network namespaces): the multi-host demo and the cluster tests.

Not part of the installed package: it drives real Consul, HAProxy and renderer processes from a
checkout. `netns` builds the hosts, `cluster` starts the production topology on them, `load`
is the client host's constant load, `__main__` is `make demo-cluster`.
"""
