"""Registering services with Consul: web apps (`register`), Docker containers (`registrator`,
the Docker SDK) and the renderer itself (`sidecar`: service `consul-renderer` with a TTL check)."""
