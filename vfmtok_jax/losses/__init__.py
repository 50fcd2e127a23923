"""Training losses (float32): tokenizer terms, LPIPS, GAN objectives; with the loaders of the
LPIPS and DINO-discriminator weights they need."""
