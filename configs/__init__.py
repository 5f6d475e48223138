"""Built-in run configs (YAML), shipped inside the package as fedsync.configs."""
