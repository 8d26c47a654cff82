"""Training stages (latent action model, FAST tokenizer, VLA) on an accelerate trainer."""
