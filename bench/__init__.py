"""Benchmarks, run by `make bench` (never by `make test`): JSON results plus a short table."""
