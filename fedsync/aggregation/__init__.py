"""Aggregation: reading updates into rules (streaming weighted means today) and the server optimizer step that turns
the aggregated delta into the next global model; maths over tensors, file reads through the storage layer."""
