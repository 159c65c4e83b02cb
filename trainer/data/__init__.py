"""Reading shard sets for training: `bucket` (fsspec reads of s3://... and other URLs, with retries and resumable
objects), `shards` (listing a set, decoding samples, batches, model input) and `stream` (the resumable, sharded,
weighted WebDataset stream each rank and DataLoader worker reads)."""
