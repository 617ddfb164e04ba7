"""The demo: a tiny web app and the local stack `make demo` runs."""
