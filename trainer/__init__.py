"""maskdm trainer: U-ViT, masks, Haar DWT, diffusion and (later) the DeepSpeed training loop.

Importing this package has no side effects: no backend selection, no distributed init, no prints."""
