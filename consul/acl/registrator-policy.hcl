# The Docker registrator registers the services its containers' `consul.service` labels name, and
# lists the agent's services to find its own. Narrow the prefix to the names your labels use
# (e.g. service_prefix "app-"): then a labelled container cannot register under any other name.
service_prefix "" {
  policy = "write"
}
node_prefix "" {
  policy = "read"
}
