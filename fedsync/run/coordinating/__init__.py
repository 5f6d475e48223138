"""The coordinator's bookkeeping: a round's intake (ledgers of markers, the aggregator), its evaluation, the
report and metrics.csv, retention, and the plan of each round's work."""
