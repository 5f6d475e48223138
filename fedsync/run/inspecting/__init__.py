"""Reading a run without driving it: the status reader and the checker behind `fedsync status` and `fedsync
verify`. YAML and hashes only: no torch."""
