"""Training losses (float32): tokenizer terms, LPIPS, GAN objectives."""
