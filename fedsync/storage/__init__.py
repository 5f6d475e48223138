"""The share: its file names, operations on its files (read, stream, write whole, list, change signatures),
the typed records of its YAML files, watching, the coordinator's lease. Imports no torch and no higher layer."""
