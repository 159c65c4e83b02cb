"""Model weights outside training: `load` (weights and config from a run, an exported .safetensors or a published
model; building the model) and `publish` (exporting a run to .safetensors with a model card, publishing to a
bucket with index.json)."""
