"""Tiny Stable-Diffusion-shaped assets for the tests.

`build_tiny_pipeline` saves, in diffusers layout, a pipeline made of the real classes a Stable
Diffusion 1.x checkpoint uses (CLIPTokenizer, CLIPTextModel, AutoencoderKL, UNet2DConditionModel,
a DDPM-family scheduler) with tiny widths and random weights. Loading it goes through exactly the
same `from_pretrained` calls as the real model, so the tests exercise the real code path; only
the sizes differ. Its images are noise: the weights were never trained.

`build_tiny_dataset` writes a small captioned image set (coloured shapes) as an imagefolder with
metadata.jsonl, the layout `datasets`' "imagefolder" builder reads.
"""
import json
import os
import random

import torch

from lora_tools.files import atomic_folder

# The tiny pipeline keeps SD1.x's structure: 4 VAE levels (8x downsampling, 4 latent channels),
# a UNet with 3 cross-attention down blocks + 1 plain block, CLIP text encoder, 77-token prompts.
TINY_RESOLUTION = 64  # pixels; latents are 8x8
TINY_TEXT_DIM = 32  # hidden size of the tiny text encoder = UNet cross_attention_dim


def _tiny_tokenizer():
    """A byte-level CLIP BPE tokenizer with no merges: every character is a token."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_unet_config():
    return dict(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=4,
    )


def build_tiny_components(seed=0, prediction_type="epsilon"):
    """The five components of a tiny SD1.x pipeline, randomly initialised with a fixed seed."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config())
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=TINY_RESOLUTION,
        scaling_factor=0.18215,  # SD1.x's value, so the scaling code path is the real one
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=514,
            hidden_size=TINY_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    # SD1.x's noise schedule (scaled_linear betas, T = 1000).
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=_tiny_tokenizer(), scheduler=scheduler)


def build_tiny_pipeline(path, seed=0, prediction_type="epsilon"):
    """Save a tiny StableDiffusionPipeline in diffusers layout at `path` (once; reused after)."""

    def write(tmp):
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            **build_tiny_components(seed, prediction_type),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp)

    return atomic_folder(path, write)


def _tiny_vae(scaling_factor):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                         norm_num_groups=8, latent_channels=4, sample_size=TINY_RESOLUTION, scaling_factor=scaling_factor)


def build_tiny_sdxl_pipeline(path, seed=0):
    """A tiny StableDiffusionXLPipeline in diffusers layout (once; reused after), SDXL's structure:
    two CLIP text encoders (the second with a projection, whose pooled output conditions the UNet),
    tokenizer_2 padding with "!" as SDXL's does, a UNet taking the size/crop ids ("text_time") and the
    two encoders' hidden states side by side (cross_attention_dim 32 + 32), a VAE with SDXL's 0.13025
    scaling factor (its force_upcast default: fp32 under fp16), and SDXL's Euler sampler."""

    def write(tmp):
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 32), layers_per_block=1, transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 4), cross_attention_dim=2 * TINY_TEXT_DIM, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + TINY_TEXT_DIM, norm_num_groups=8)
        config = dict(vocab_size=514, hidden_size=TINY_TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                      projection_dim=TINY_TEXT_DIM)
        text_encoder = CLIPTextModel(CLIPTextConfig(**config))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**dict(config, hidden_act="gelu")))
        tokenizer_2 = _tiny_tokenizer()
        tokenizer_2.pad_token = "!"  # SDXL's second tokenizer pads with "!", not with the end token
        scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                           beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
        StableDiffusionXLPipeline(vae=_tiny_vae(0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                  tokenizer=_tiny_tokenizer(), tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                  force_zeros_for_empty_prompt=True).save_pretrained(tmp)

    return atomic_folder(path, write)


COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square")


def make_shape_image(colour, shape, background, size=(80, 72), jitter=0):
    """One picture of a coloured shape on a coloured background (PIL, RGB)."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, COLOURS[background])
    draw = ImageDraw.Draw(img)
    box = (w // 4 + jitter, h // 4, 3 * w // 4 + jitter, 3 * h // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return img


def build_tiny_dataset(path, num_images=8, seed=0):
    """Save `num_images` captioned pictures as an imagefolder with metadata.jsonl (once)."""

    def write(tmp):
        rng = random.Random(seed)
        names = list(COLOURS)
        with open(os.path.join(tmp, "metadata.jsonl"), "w") as f:
            for i in range(num_images):
                colour = names[i % len(names)]
                background = names[(i + 1 + i // len(names)) % len(names)]
                shape = SHAPES[(i // 2) % len(SHAPES)]
                # 80x72 on purpose: not square and not RESOLUTION, so resize + crop are exercised.
                img = make_shape_image(colour, shape, background, jitter=rng.randint(-4, 4))
                name = f"{i:03d}.png"
                img.save(os.path.join(tmp, name))
                caption = f"a {colour} {shape} on a {background} background"
                f.write(json.dumps({"file_name": name, "text": caption}) + "\n")

    return atomic_folder(path, write)
