"""Stage 1, the Consul source: what the templates use, kept fresh with blocking queries.

`client` (HTTP to the local agent: index/wait/stale, one status → error mapping) →
`dependency` (one key per datum a template reads) → `watch` (the Store, the connection budget:
blocking queries, catalog-wide triggers, sweeps; `batch` reads many services at once).
"""
