"""The method itself, with no data, training or file-format concerns: the Haar DWT, masks, the diffusion
schedules and losses, the DDIM/DDPM samplers, image conversion and the U-ViT (`models/`). `settings` holds the
torch-free registries (names every layer validates against) and `SamplingConfig`."""
