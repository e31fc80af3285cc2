"""The Stable Diffusion XL base 1.0 architecture from its published configs (no weights, no download).

These are the `config.json` values of stabilityai/stable-diffusion-xl-base-1.0's unet/, vae/,
text_encoder/ (CLIP ViT-L/14's text tower) and text_encoder_2/ (OpenCLIP ViT-bigG/14's, with its
projection) folders. Built on the meta device they give the real parameter counts instantly; with
random weights, the real compute, which is what counting and benchmarking need.
"""
import contextlib

import torch

SDXL_UNET_CONFIG = dict(
    sample_size=128,  # 1024 px / 8
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,  # CLIP-L's 768 + bigG's 1280, concatenated
    use_linear_projection=True,
    addition_embed_type="text_time",  # the pooled prompt and the size/crop ids enter with the timestep
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 ids x 256 + bigG's pooled 1280
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)

SDXL_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,  # overflows in fp16: decode (and encode) in fp32
)

CLIP_L_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G_CONFIG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)

# The published parameter count of the SDXL base 1.0 UNet (checked by tests/test_sdxl.py).
SDXL_UNET_PARAMS = 2_567_463_684


def _device_ctx(device):
    return torch.device(device) if device is not None else contextlib.nullcontext()


def sdxl_unet(device=None):
    """SDXL's UNet2DConditionModel; device="meta" builds it without allocating memory."""
    from diffusers import UNet2DConditionModel

    with _device_ctx(device):
        return UNet2DConditionModel(**SDXL_UNET_CONFIG)


def sdxl_vae(device=None):
    from diffusers import AutoencoderKL

    with _device_ctx(device):
        return AutoencoderKL(**SDXL_VAE_CONFIG)


def sdxl_text_encoders(device=None):
    """(CLIP-L's text model, bigG's text model with its projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with _device_ctx(device):
        return (CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG)),
                CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_CONFIG)))
