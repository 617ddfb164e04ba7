"""Stage 3, delivery: make HAProxy (or a template's command) run what was rendered.

`install` is the front door: it takes a rendered file and decides between the Runtime API (only
server lines changed: `runtime` plans and applies it, the file is written behind it) and
validate → swap → reload or command (`write` stages, checks and swaps; `apply` reloads or runs
the command), with retries and backoff.
"""
