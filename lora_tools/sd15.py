"""The Stable Diffusion 1.5 architecture from its published configs (no weights, no download).

These are the `config.json` values of stable-diffusion-v1-5/stable-diffusion-v1-5's unet/, vae/ and
text_encoder/ folders. Built with random weights (or on the meta device, instantly) they give the
real parameter counts and the real compute, which is what counting and benchmarking need.
"""
import contextlib

import torch

SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
    center_input_sample=False,
)

SD15_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
    scaling_factor=0.18215,
)

SD15_TEXT_ENCODER_CONFIG = dict(  # CLIP ViT-L/14 text tower
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

# The published parameter count of the SD1.5 UNet (checked by tests/test_lora_model.py).
SD15_UNET_PARAMS = 859_520_964


def _device_ctx(device):
    return torch.device(device) if device is not None else contextlib.nullcontext()


def sd15_unet(device=None):
    """SD1.5's UNet2DConditionModel; device="meta" builds it without allocating memory."""
    from diffusers import UNet2DConditionModel

    with _device_ctx(device):
        return UNet2DConditionModel(**SD15_UNET_CONFIG)


def sd15_vae(device=None):
    from diffusers import AutoencoderKL

    with _device_ctx(device):
        return AutoencoderKL(**SD15_VAE_CONFIG)


def sd15_text_encoder(device=None):
    from transformers import CLIPTextConfig, CLIPTextModel

    with _device_ctx(device):
        return CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG))


def sd15_tokenizer():
    """A stand-in for SD1.5's CLIP tokenizer (the real one is a download): the demo base model's
    small CLIP BPE tokenizer. Its ids are valid for SD's 49,408-entry vocabulary and it pads to the
    same 77 positions, which is all a speed measurement needs."""
    from lora_tools.demo_base import build_tokenizer

    return build_tokenizer()
