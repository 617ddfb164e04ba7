"""The loop's rooms: one pass of render → deliver → report (`cycle`), the templates it renders
(`templates`), the operator's side tasks (`operator`: status server, self-registration) and the
outage progress line (`outage`). `renderer/runner.py` only waits and calls them."""
