"""Stage 2, rendering: Jinja2 templates fed from the Store.

`template` (the environment, the functions templates call, safe output) uses `guard` (the
anti-empty guard: a service that had instances keeps them for a grace period) and `listing` (the
catalog's services and their names, built once per catalog answer); `files` watches template
files on disk for edits.
"""
