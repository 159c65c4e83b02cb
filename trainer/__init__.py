"""maskdm trainer. The modules at this level are the commands users type (pretrain, finetune, sample, evaluate,
export, schedule, quickstart, checkpoints): each parses its flags, builds one config and calls the library. The
library is one folder per concern: `core` (DWT, masks, diffusion, sampling, U-ViT), `data` (bucket reads, shards,
the training stream), `train` (config, loop, EMA, checkpoints, run directory), `weights` (load, publish) and
`eval` (metrics, protocol, plots). docs/dev-notes.md has the map.

Importing this package has no side effects: no backend selection, no distributed init, no prints."""
