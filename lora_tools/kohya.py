"""Export a trained LoRA as a kohya-ss ("sd-scripts") file, the format Stable Diffusion WebUI
(A1111 / Forge), ComfyUI and most other tools load, beside the diffusers file.

Per adapted layer, as kohya-ss/sd-scripts writes it for SD1.x (networks/lora.py); SDXL's two text
encoders are lora_te1_ (CLIP-L) and lora_te2_ (bigG), its UNet's layers keep diffusers' names:

    lora_unet_<diffusers UNet module path, '.' -> '_'>.lora_down.weight   = PEFT lora_A  (r x d_in)
    lora_unet_<...>.lora_up.weight                                       = PEFT lora_B  (d_out x r)
    lora_unet_<...>.alpha                                                = α, a 0-dim tensor
    lora_te_text_model_<CLIP module path after 'text_model.'>.<the same three>

and the layer's update is (α/r)·up·down with r = lora_down.shape[0], PEFT's (α/r)·B·A.

The renaming is diffusers' `convert_state_dict_to_kohya`, with the two fixes it needs (diffusers 0.42):
1. Text-encoder prefix. Under transformers 5 (which flattened CLIPTextModel to `encoder.layers…`) it
   writes `lora_te1_encoder_…`, and ComfyUI and WebUI drop every such key (WebUI silently): they look
   up `lora_te_text_model_encoder_layers_…`, sd-scripts' SD1.x name (`lora_te1_` is SDXL's first encoder).
2. The real α. It writes α = r for every layer, so a LoRA trained with α ≠ r would load at the wrong
   strength; and as a kohya file always means α/r, an rsLoRA (α/√r) is written as α' = α·√r.
tests/test_kohya.py loads the file with diffusers' own kohya loader and checks every name against
ComfyUI's look-up. Reading it back: `pipe.load_lora_weights(folder, weight_name=...)`.
"""
import datetime
import json
import math
import os

import torch

from lora_tools.config import UserError
from lora_tools.files import atomic_path

EXPORTER_VERSION = "1"  # bump when what this module writes changes


DIFFUSERS_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}  # its names


def to_kohya(state_dicts, alphas, prefixes, dtype=torch.float32, *, use_rslora=False):
    """`get_peft_model_state_dict` of each trained model, {component: state dict} ("unet", "text_encoder",
    "text_encoder_2"), -> {kohya name: tensor}, all in `dtype` on the CPU. alphas: {component: lora_alpha}
    (each layer's rank comes from its tensors, so PEFT's rank_pattern is fine); prefixes: {component: kohya
    prefix} (SD1.x: lora_unet, lora_te; SDXL: lora_unet, lora_te1, lora_te2)."""
    from diffusers.utils import convert_state_dict_to_kohya

    peft_sd = {}
    for component, sd in state_dicts.items():
        for k, v in sd.items():
            if component != "unet" and not k.startswith("text_model."):
                k = "text_model." + k  # fix 1a: sd-scripts names CLIP layers as transformers 4 did
            peft_sd[f"{component}.{k}"] = v
    ours = {DIFFUSERS_PREFIXES[c]: (prefixes[c], alphas[c]) for c in state_dicts}
    out = {}
    for key, v in convert_state_dict_to_kohya(peft_sd).items():
        theirs = key.split("_", 2)[0] + "_" + key.split("_", 2)[1]  # lora_unet, lora_te1, lora_te2
        prefix, alpha = ours[theirs]
        key = prefix + key[len(theirs):]  # fix 1b: SD1.x has one text encoder, lora_te_
        if key.endswith(".alpha"):  # diffusers put the layer's rank r here
            # fix 2: the trained α (rsLoRA: α·√r, since (α·√r)/r = α/√r); 0-dim in `dtype`, like sd-scripts
            v = torch.tensor(alpha * math.sqrt(v.item()) if use_rslora else float(alpha), dtype=dtype)
        out[key] = v.detach().to("cpu", dtype).contiguous()
    return out


def _local_name(name):
    """sd-scripts writes a local model's or dataset's folder name, not its full path."""
    return os.path.basename(os.path.normpath(name)) if name and os.path.exists(name) else name


def kohya_metadata(info, family_metadata=()):
    """The safetensors metadata (str -> str) that WebUI and ComfyUI show for a kohya LoRA, with the
    keys and str() values of kohya-ss/sd-scripts' train_network.py and its ModelSpec 1.0.0 keys for
    an SD1.x LoRA; family_metadata: (key, value) pairs for another family (SDXL's base model version and
    architecture: WebUI hides a LoRA tagged for another family). `info`: the script's settings
    (cfg.as_dict()) plus the facts of the run: steps, num_images, started_at and finished_at (unix
    times). Settings that are None are left out."""
    c = info
    args = {k.lower(): c[k] for k in ("TARGET_MODULES", "USE_DORA", "USE_RSLORA", "TRAIN_TEXT_ENCODER")}
    if c["TRAIN_TEXT_ENCODER"]:
        args["text_encoder_target_modules"] = c["TEXT_ENCODER_TARGET_MODULES"]
    if c["LORAPLUS_LR_RATIO"] is not None:
        args["loraplus_lr_ratio"] = c["LORAPLUS_LR_RATIO"]
    res = c["RESOLUTION"]
    versions = ", ".join(f"{m} {__import__(m).__version__}" for m in ("torch", "diffusers", "peft", "transformers"))
    meta = {
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_network_module": "networks.lora",
        "ss_sd_model_name": _local_name(c["MODEL_ID"]),
        "ss_output_name": c["OUTPUT_NAME"],
        "ss_network_dim": c["LORA_RANK"],
        "ss_network_alpha": c["LORA_ALPHA"],  # as trained; with rsLoRA the .alpha tensors hold α·√r
        "ss_network_dropout": c["LORA_DROPOUT"],
        "ss_network_args": json.dumps(args, sort_keys=True, default=str),
        "ss_learning_rate": c["LEARNING_RATE"],
        "ss_unet_lr": c["LEARNING_RATE"],
        "ss_text_encoder_lr": (c["TEXT_ENCODER_LEARNING_RATE"] or c["LEARNING_RATE"]) if c["TRAIN_TEXT_ENCODER"] else None,
        "ss_lr_scheduler": c["LR_SCHEDULER"],
        "ss_lr_warmup_steps": c["LR_WARMUP_STEPS"],
        "ss_max_grad_norm": c["MAX_GRAD_NORM"],
        "ss_max_train_steps": c["MAX_TRAIN_STEPS"],
        "ss_num_epochs": c["NUM_EPOCHS"] if c["MAX_TRAIN_STEPS"] is None else None,  # else NUM_EPOCHS is unused
        "ss_steps": c["steps"],  # optimizer steps done when the file was written
        "ss_batch_size_per_device": c["BATCH_SIZE"],
        "ss_gradient_accumulation_steps": c["GRADIENT_ACCUMULATION_STEPS"],
        "ss_num_train_images": c["num_images"],
        "ss_dataset_dirs": json.dumps({_local_name(c["DATA_DIR"] or c["DATASET_NAME"]):
                                       {"n_repeats": 1, "img_count": int(c["num_images"])}}),
        "ss_resolution": (res, res),  # sd-scripts: str(tuple) -> "(512, 512)"
        "ss_seed": c["SEED"],
        "ss_mixed_precision": c["MIXED_PRECISION"] if c["MIXED_PRECISION"] != "auto" else None,  # resolved at run time
        "ss_gradient_checkpointing": c["GRADIENT_CHECKPOINTING"],
        "ss_cache_latents": c["CACHE_LATENTS"],
        "ss_flip_aug": c["RANDOM_FLIP"],
        "ss_training_started_at": c["started_at"],
        "ss_training_finished_at": c["finished_at"],
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",  # what sd-scripts writes for an SD1.x LoRA
        "modelspec.title": c["OUTPUT_NAME"],
        "modelspec.resolution": f"{res}x{res}",
        # sd-scripts: datetime.fromtimestamp(int(ts)).isoformat(), local time
        "modelspec.date": datetime.datetime.fromtimestamp(int(c["finished_at"])).isoformat(),
        "lora_complete_example_version": f"kohya-export/{EXPORTER_VERSION} ({versions})",
    }
    meta.update(dict(family_metadata))
    return {k: str(v) for k, v in meta.items() if v is not None}


def save_kohya_file(path, state_dicts, alphas, prefixes, metadata, dtype=torch.float32, *, use_rslora=False):
    """Write the kohya file (to_kohya's arguments) atomically: an older file stays until the new one is
    complete. Refuses (UserError) if a tensor is NaN/inf after the cast to `dtype`: an fp32 value past
    fp16's 65504 becomes inf only there."""
    from safetensors.torch import save_file

    tensors = to_kohya(state_dicts, alphas, prefixes, dtype, use_rslora=use_rslora)
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{len(bad)} LoRA tensors hold NaN/inf in {str(dtype).replace('torch.', '')} (e.g. {bad[0]}), "
                        f"so {path} was not written" + (" — try saving in fp32 or bf16" if dtype == torch.float16 else ""))
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
