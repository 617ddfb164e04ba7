# The Consul agent's own token (acl.tokens.agent): it registers its node and syncs the catalog.
# The compose stack's server is named `consul` (node_name in consul/server*.hcl).
node "consul" {
  policy = "write"
}
service_prefix "" {
  policy = "read"
}
