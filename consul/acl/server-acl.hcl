# ACLs on, default deny: a request without a token (or with an unknown one) may do nothing.
# The compose stack mounts this file next to server.hcl; docker/consul-acl.sh generates the
# management and agent tokens and creates a policy and a token per role from consul/acl/*-policy.hcl.
#
# By hand, on your own servers: bootstrap once with  consul acl bootstrap  (prints the management
# token), then per role (here the renderer):
#   consul acl policy create -name consul-renderer -rules @consul/acl/renderer-policy.hcl
#   consul acl token create -description "consul-renderer" -policy-name consul-renderer
# and give that token to the renderer with --token-file (or CONSUL_HTTP_TOKEN_FILE).
acl {
  enabled                  = true
  default_policy           = "deny"
  enable_token_persistence = true
}
