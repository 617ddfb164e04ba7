"""Access to HAProxy, used by delivery and the runner: the one place that speaks to it.

`control` (the master CLI and the Runtime API sockets, `haproxy -c`), `config_text` (reading a
configuration: sections, server lines by `keywords`, HAProxy's own grammar), `child` (HAProxy
as a child process, `--exec-haproxy`), `binaries` (finding the binary, version probes).
"""
