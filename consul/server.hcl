# Consul server of the compose stack: a single server with the UI. The stack adds
# consul/acl/server-acl.hcl (ACLs on, default deny) and its generated tokens; see consul/acl/.
server           = true
node_name        = "consul"  # named in consul/acl/agent-policy.hcl
bootstrap_expect = 1
ui_config { enabled = true }
client_addr      = "0.0.0.0"
data_dir         = "/consul/data"
log_level        = "INFO"
dns_config { only_passing = true }
