"""maskdm offline sharding pipeline: raw corpora -> WebDataset shards of 256 px face crops + Haar DWT.

Never imports `trainer` (see docs/design.md, Layout)."""
