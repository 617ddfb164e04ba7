# The compose stack's Consul server for Consul 1.8 (the stand-in image of scripts/standin_images.py):
# the same as server.hcl, with `ui = true` where 1.9+ writes `ui_config { enabled = true }`.
server           = true
node_name        = "consul"  # named in consul/acl/agent-policy.hcl
bootstrap_expect = 1
ui               = true
client_addr      = "0.0.0.0"
data_dir         = "/consul/data"
log_level        = "INFO"
dns_config { only_passing = true }
