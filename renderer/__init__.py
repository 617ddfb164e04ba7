"""consul-renderer: keep HAProxy's configuration in step with a Consul service catalog.

The layout follows the data flow; read it top-down:

    config, errors, commands,        what every stage uses: settings, errors and the typed
    children, logs, decay            outcomes they report under, running a program, supervising
                                     a child process, logging, counts that fade
    status/                          state + metrics: the one model behind the check, /status,
                                     the operator's page and `consul-renderer status`
    haproxy/                         access to HAProxy: the typed boundary for catalog values
                                     (checked), Runtime API commands from checked words
                                     (runtime_grammar), control sockets, config text and its
                                     keyword grammar, HAProxy as a child, binaries
    source/    client → dependency → watch (+ store, sweep, summary, batch)   Consul → the Store
    render/    template (+ listing, guard, files)         the Store → rendered text
    deliver/   delivery (+ quarantine, busy_ports) → install → runtime | write → apply, certs, report
                                                          rendered text → HAProxy
    registration/   register, registrator, sidecar        putting services into Consul
    wakeups, loop/, runner, cli       the loop (wait → render → deliver → report), woken by typed
                                     causes (new data, signals, HAProxy gone, …): loop/ holds one
                                     pass (cycle), the templates, the operator's tasks, the
                                     outage line and the garbage collector's pacing (collector);
                                     runner only waits and calls them; the CLI

A module imports only from its own stage or the ones listed above it (tests/unit/test_layout.py
checks this).
"""

__version__ = "0.1.0"
