"""Configs of the toy world's tiny models, all ordinary diffusers / transformers classes.

Sizes were chosen by measurement on 2 CPU cores (docs/toy_world.md): 32x32 px images, a x4 VAE
(8x8 latents), text encoders of width 32-64 over a 16-token context.
"""

from __future__ import annotations

RESOLUTION = 32
MAX_TOKENS = 16  # captions are at most 9 words; BOS/EOS included this leaves room

VAE_SD = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=RESOLUTION,
)
# FLUX-style: 16 latent channels, no quant convs; shift/scale are set from data after training.
VAE_FLUX = dict(VAE_SD, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)

CLIP_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS,
    projection_dim=64,
    hidden_act="quick_gelu",
)
# SDXL has two encoders whose penultimate states are concatenated; encoder 2 also gives the pooled embed.
CLIP_TEXT_SDXL_1 = dict(CLIP_TEXT, hidden_size=32, intermediate_size=64, projection_dim=32)
CLIP_TEXT_SDXL_2 = dict(CLIP_TEXT, hidden_size=32, intermediate_size=64, projection_dim=32)

T5_TEXT = dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
               is_encoder_decoder=False, use_cache=False, relative_attention_num_buckets=8,
               relative_attention_max_distance=16)

UNET_SD = dict(
    sample_size=RESOLUTION // 4,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
)
UNET_SDXL = dict(
    UNET_SD,
    cross_attention_dim=64,  # 32 (encoder 1) + 32 (encoder 2)
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 32,  # six time ids + pooled embed of encoder 2
    use_linear_projection=True,
)

FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels packed 2x2
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=32,  # T5 width
    pooled_projection_dim=64,  # CLIP width
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)

JUDGE = dict(width=32, feature_dim=64)
