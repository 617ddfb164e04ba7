# A Consul client agent, for hosts that run web apps or the renderer next to a separate server
# cluster. Point retry_join at your servers.
server      = false
data_dir    = "/consul/data"
client_addr = "0.0.0.0"
retry_join  = ["consul"]
log_level   = "INFO"
