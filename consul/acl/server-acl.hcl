# ACL-enabled variant: add this file to the server's config dir next to server.hcl.
# Bootstrap once:  consul acl bootstrap      (prints the management token)
# Then create the renderer's policy and token:
#   consul acl policy create -name consul-renderer -rules @consul/acl/renderer-policy.hcl
#   consul acl token create -description "consul-renderer" -policy-name consul-renderer
# and give that token to the renderer with --token-file (or CONSUL_HTTP_TOKEN_FILE).
acl {
  enabled                  = true
  default_policy           = "deny"
  enable_token_persistence = true
}
