# What consul-renderer needs: read on the services and nodes its templates use, and write on its
# own registration (service `consul-renderer` and its TTL check; drop this rule with
# --register-self=false). The default template reads no KV: a template that uses key() or
# key_prefix() needs read on those keys too, e.g.  key_prefix "haproxy/" { policy = "read" }
service_prefix "" {
  policy = "read"
}
node_prefix "" {
  policy = "read"
}
service "consul-renderer" {
  policy = "write"
}
# Lets the renderer follow its agent's log (/v1/agent/monitor) to hear at once when a
# Consul server leaves gossip; without it the agent's members are read every server_watch (2 s).
# It also lets the token read any agent's log and /v1/agent/self: narrower, agent "<node name of
# the renderer's agent>" { policy = "read" }, one policy per host.
agent_prefix "" {
  policy = "read"
}
