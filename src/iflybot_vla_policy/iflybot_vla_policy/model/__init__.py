"""The iFlyBot-VLA model: VLM backbones, the DiT action expert, FAST tokens, latent actions."""
