"""Cross-stream batching: the scheduler that forms batches from every stream's frames, and its statistics."""
