"""Model families: what differs between Stable Diffusion 1.x/2.x and its relatives, as data in one place.

The training story (lora_complete_example.py) is the same for every family: encode the prompt,
noise a latent, let the UNet predict, take the loss. What a family changes is said here and nowhere
else: which pipeline class holds it, its text encoders (a tuple of (tokenizer, text encoder) folder
pairs), how a prompt becomes the UNet's conditioning, and what its LoRA files are called for other
tools. The script asks `detect(MODEL_ID)` once and passes the answer along.

    family = detect("stable-diffusion-v1-5/stable-diffusion-v1-5")   # reads model_index.json
    family.text_parts          (("tokenizer", "text_encoder"),)
    encode_prompt(family, text_encoders, input_ids)   {"encoder_hidden_states": (B, 77, d)}

"""
import json
import os
from dataclasses import dataclass

from lora_tools.config import UserError


@dataclass(frozen=True)
class Family:
    """One model family. The LoRA file's keys are prefixed by the component names of `text_parts`
    and "unet" (diffusers' convention: the prefix is the pipeline component the layer lives in)."""

    name: str  # for people: "SD 1.x/2.x"
    pipeline: str  # the diffusers pipeline class that loads, samples and reads LoRA files
    text_parts: tuple  # ((tokenizer folder, text encoder folder), ...), in the order the UNet joins them
    pipeline_kwargs: tuple = ()  # (name, value) pairs from_pretrained needs for this pipeline class
    webui: tuple = ()  # (component, kohya prefix) pairs of the WebUI/ComfyUI file
    webui_metadata: tuple = ()  # (key, value) pairs that tell WebUI/ComfyUI the base model's family


SD1 = Family(
    name="SD 1.x/2.x",
    pipeline="StableDiffusionPipeline",
    text_parts=(("tokenizer", "text_encoder"),),
    pipeline_kwargs=(("safety_checker", None), ("requires_safety_checker", False)),  # no NSFW filter
    webui=(("unet", "lora_unet"), ("text_encoder", "lora_te")),
    webui_metadata=(("ss_base_model_version", "sd_v1"), ("ss_v2", "False"),
                    ("modelspec.architecture", "stable-diffusion-v1/lora")),
)
FAMILIES = {SD1.pipeline: SD1}


def read_model_index(model_id, revision=None):
    """The pipeline folder's model_index.json (local folder or hub id), or None where it has none."""
    if os.path.isdir(model_id):
        path = os.path.join(model_id, "model_index.json")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(model_id, revision=revision)


def detect(model_id, revision=None):
    """The Family of MODEL_ID, from the pipeline class its model_index.json names. A folder without
    one is taken for SD 1.x/2.x when it has the parts (tokenizer, text_encoder, vae, unet, scheduler)."""
    index = read_model_index(model_id, revision)
    if index is None:
        return SD1
    name = index.get("_class_name", "")
    if name not in FAMILIES:
        known = ", ".join(f"{f.pipeline} ({f.name})" for f in FAMILIES.values())
        raise UserError(f"MODEL_ID={model_id!r} is a {name or 'pipeline of no known class'}, which this "
                        f"script cannot train — it trains {known}; pick such a model")
    return FAMILIES[name]


def encode_prompt(family, text_encoders, input_ids):
    """τθ(y): token ids (B, n_encoders, 77) -> the UNet's text conditioning, a dict of tensors per example.
    SD 1.x/2.x: the text encoder's last hidden states, (B, 77, d), what cross-attention reads."""
    hidden = text_encoders[0](input_ids[:, 0].to(text_encoders[0].device), return_dict=False)[0]
    return {"encoder_hidden_states": hidden}



def unet_conditioning(text, batch):
    """The UNet's keyword arguments from a prompt's encoding (encode_prompt's dict, or a cached batch
    holding it): the hidden states its cross-attention reads."""
    return {"encoder_hidden_states": text["encoder_hidden_states"]}
