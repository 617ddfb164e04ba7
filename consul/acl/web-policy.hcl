# A web app under `consul-renderer register --name web`: it may register (and deregister) the
# service `web`, nothing else. One policy per service name.
service "web" {
  policy = "write"
}
node_prefix "" {
  policy = "read"
}
