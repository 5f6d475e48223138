"""The worker's bookkeeping: its data (shards placed on the device) and serving inference jobs."""
