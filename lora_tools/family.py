"""Model families: what differs between Stable Diffusion 1.x/2.x and SDXL, as data in one place.

The training story (lora_complete_example.py) is the same for every family: encode the prompt,
noise a latent, let the UNet predict, take the loss. What a family changes is said here and nowhere
else: which pipeline class holds it, its text encoders (a tuple of (tokenizer, text encoder) folder
pairs), how a prompt becomes the UNet's conditioning, and what its LoRA files are called for other
tools. The script asks `detect(MODEL_ID)` once and passes the answer along.

    family = detect("stabilityai/stable-diffusion-xl-base-1.0")   # reads model_index.json
    family.text_parts     (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    encode_prompt(family, text_encoders, input_ids)   {"encoder_hidden_states": (B, 77, 2048),
                                                       "text_embeds": (B, 1280)}   (SDXL)
    unet_conditioning(text, batch)   the UNet's keyword arguments

SDXL (Podell et al. 2023, arXiv:2307.01952): two text encoders, CLIP ViT-L and OpenCLIP ViT-bigG, whose
penultimate hidden states are concatenated for cross-attention, bigG's pooled embedding added to the
timestep embedding, and "micro-conditioning" on the picture's original size and crop (Sec. 2.2).
"""
import json
import os
from dataclasses import dataclass

import torch

from lora_tools.config import UserError


@dataclass(frozen=True)
class Family:
    """One model family. The LoRA file's keys are prefixed by the component names of `text_parts`
    and "unet" (diffusers' convention: the prefix is the pipeline component the layer lives in)."""

    name: str  # for people: "SD 1.x/2.x", "SDXL"
    pipeline: str  # the diffusers pipeline class that loads, samples and reads LoRA files
    text_parts: tuple  # ((tokenizer folder, text encoder folder), ...), in the order the UNet joins them
    penultimate: bool  # cross-attention reads each encoder's penultimate hidden states (SDXL), else the last
    pooled: bool  # the last encoder's pooled, projected embedding conditions the UNet too (SDXL)
    size_and_crop: bool  # the UNet is told each picture's original size and crop (SDXL's micro-conditioning)
    pipeline_kwargs: tuple = ()  # (name, value) pairs from_pretrained needs for this pipeline class
    webui: tuple = ()  # (component, kohya prefix) pairs of the WebUI/ComfyUI file
    webui_metadata: tuple = ()  # (key, value) pairs that tell WebUI/ComfyUI the base model's family
    embedding_names: tuple = ("emb_params",)  # a new token's file: one tensor per text encoder


SD1 = Family(
    name="SD 1.x/2.x",
    pipeline="StableDiffusionPipeline",
    text_parts=(("tokenizer", "text_encoder"),),
    penultimate=False, pooled=False, size_and_crop=False,
    pipeline_kwargs=(("safety_checker", None), ("requires_safety_checker", False)),  # no NSFW filter
    webui=(("unet", "lora_unet"), ("text_encoder", "lora_te")),
    webui_metadata=(("ss_base_model_version", "sd_v1"), ("ss_v2", "False"),
                    ("modelspec.architecture", "stable-diffusion-v1/lora")),
)
SDXL = Family(
    name="SDXL",
    pipeline="StableDiffusionXLPipeline",
    text_parts=(("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
    penultimate=True, pooled=True, size_and_crop=True,
    webui=(("unet", "lora_unet"), ("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te2")),
    webui_metadata=(("ss_base_model_version", "sdxl_base_v1-0"), ("ss_v2", "False"),
                    ("modelspec.architecture", "stable-diffusion-xl-v1-base/lora")),
    embedding_names=("clip_l", "clip_g"),  # diffusers' advanced SDXL script's format, read by WebUI/ComfyUI
)
FAMILIES = {f.pipeline: f for f in (SD1, SDXL)}


def read_config(model_id, subfolder=None, revision=None):
    """A pipeline folder's model_index.json (or a component's config.json), local or on the hub; None if
    a local folder has none."""
    if os.path.isdir(model_id):
        path = os.path.join(model_id, subfolder or "", "config.json" if subfolder else "model_index.json")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    from diffusers import DiffusionPipeline, ModelMixin  # (a hub id: a small download, then the cache)

    kind = ModelMixin if subfolder else DiffusionPipeline
    return kind.load_config(model_id, subfolder=subfolder, revision=revision)


def detect(model_id, revision=None):
    """The Family of MODEL_ID, from the pipeline class its model_index.json names. A folder without
    one is SDXL when its UNet takes the size/crop ids ("text_time") and it has a text_encoder_2/."""
    index = read_config(model_id, revision=revision)
    if index is None:
        unet = read_config(model_id, "unet", revision) or {}
        two = os.path.isdir(os.path.join(model_id, "text_encoder_2"))
        return SDXL if unet.get("addition_embed_type") == "text_time" and two else SD1
    name = index.get("_class_name", "")
    if name not in FAMILIES:
        known = ", ".join(f"{f.pipeline} ({f.name})" for f in FAMILIES.values())
        raise UserError(f"MODEL_ID={model_id!r} is a {name or 'pipeline of no known class'}, which this "
                        f"script cannot train — it trains {known}; pick such a model")
    return FAMILIES[name]


def native_resolution(model_id, revision=None):
    """The picture size the model was trained at: its UNet's sample_size times the VAE's downsampling
    (SD 1.5: 64 x 8 = 512; SD 2.x 768-v: 96 x 8 = 768; SDXL: 128 x 8 = 1024)."""
    unet = read_config(model_id, "unet", revision) or {}
    vae = read_config(model_id, "vae", revision) or {}
    return unet.get("sample_size", 64) * 2 ** (len(vae.get("block_out_channels", (0, 0, 0, 0))) - 1)


def encode_prompt(family, text_encoders, input_ids, dropped=None):
    """τθ(y): token ids (B, n_encoders, 77) -> the UNet's text conditioning, a dict of tensors per example.
    SD 1.x/2.x: the text encoder's last hidden states, (B, 77, d), what cross-attention reads. SDXL: each
    encoder's penultimate hidden states, CLIP-L's first, concatenated (B, 77, 768 + 1280), and bigG's
    pooled, projected embedding (B, 1280), as StableDiffusionXLPipeline.encode_prompt makes them.
    dropped (B,) bool: the examples whose caption was dropped (their ids are the empty caption's); SDXL
    pipelines encode an empty prompt as zeros (force_zeros_for_empty_prompt), so these become zeros."""
    hidden, pooled = [], None
    for i, te in enumerate(text_encoders):
        out = te(input_ids[:, i].to(te.device), output_hidden_states=family.penultimate)
        hidden.append(out.hidden_states[-2] if family.penultimate else out[0])
        if family.pooled and out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first
            pooled = out[0]
    text = {"encoder_hidden_states": torch.cat(hidden, dim=-1)} | ({"text_embeds": pooled} if family.pooled else {})
    if family.pooled and dropped is not None and dropped.any():
        text = {k: v * ~dropped.to(v.device).view(-1, *[1] * (v.ndim - 1)) for k, v in text.items()}
    return text


def unet_conditioning(text, batch):
    """The UNet's keyword arguments from a prompt's encoding (encode_prompt's dict, or a cached batch
    holding it): the hidden states its cross-attention reads; for SDXL also the pooled embedding and
    each picture's size and crop, (B, 6): (original h, w, crop top, left, target h, w)."""
    cond = {"encoder_hidden_states": text["encoder_hidden_states"]}
    if "text_embeds" in text:  # SDXL (Podell et al. 2023, Sec. 2.2)
        cond["added_cond_kwargs"] = {"text_embeds": text["text_embeds"], "time_ids": batch["time_ids"]}
    return cond
