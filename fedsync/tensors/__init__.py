"""Tensors in the share: model states to and from safetensors files (written whole with their hash, read back
only verified), the encodings a worker writes its update in, and the residuals error feedback keeps on the
worker's own disk. The torch side of the storage layer; below learning and aggregation."""
