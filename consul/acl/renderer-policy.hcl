# What consul-renderer needs: read on the services, nodes and keys its templates use.
# Narrow the prefixes to your own naming if you can.
service_prefix "" {
  policy = "read"
}
node_prefix "" {
  policy = "read"
}
key_prefix "" {
  policy = "read"
}
# Only for `consul-renderer register` and the Docker registrator: register their own services.
# Give those a separate token with:  service_prefix "web" { policy = "write" }
