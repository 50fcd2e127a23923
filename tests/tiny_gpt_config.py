"""A few-step GPT config for subprocess tests (`--config.data.codes=DIR` points at codes)."""

from configs import gpt as gpt_configs


def get_config(arg=None):
  del arg
  c = gpt_configs.get_config("gpt_b,runlocal")
  c.model.update(vocab_size=64, num_classes=4, block_size=16, dim=32, num_layers=2,
                 num_heads=4, num_kv_heads=2, multiple_of=32, dtype="float32")
  c.data.held_out = 8
  c.eval_every = 0
  c.async_checkpoint = False
  return c
