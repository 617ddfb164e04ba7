# Consul server of the compose stack: a single server with the UI. ACLs are off in the demo; see
# consul/acl/ for the ACL-enabled variant and the policy the renderer needs.
server           = true
bootstrap_expect = 1
ui_config { enabled = true }
client_addr      = "0.0.0.0"
data_dir         = "/consul/data"
log_level        = "INFO"
dns_config { only_passing = true }
