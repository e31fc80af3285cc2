"""Export a trained LoRA as a kohya-ss ("sd-scripts") file, the format Stable Diffusion WebUI
(A1111 / Forge), ComfyUI and most other SD1.x tools load, beside the diffusers file.

The kohya format, as kohya-ss/sd-scripts writes it for SD1.x (networks/lora.py), per adapted layer:

    lora_unet_<diffusers UNet module path, '.' -> '_'>.lora_down.weight   = PEFT lora_A  (r x d_in)
    lora_unet_<...>.lora_up.weight                                       = PEFT lora_B  (d_out x r)
    lora_unet_<...>.alpha                                                = alpha, a 0-dim tensor
    lora_te_text_model_<CLIP module path after 'text_model.'>.<same three entries>

and the layer's update is (alpha / r) * up @ down with r = lora_down.shape[0], the same as PEFT's
(lora_alpha / r) * B @ A. sd-scripts builds SD1.x names from a diffusers-layout UNet, so
`to_out.0` becomes `to_out_0`; the text encoder is `lora_te_` (SDXL files use lora_te1_/lora_te2_).

Why not just `diffusers.utils.convert_state_dict_to_kohya`? In diffusers 0.42 it
- names the text encoder `lora_te1_` (SDXL's first encoder), not SD1.x's `lora_te_`;
- writes every `.alpha` as the rank (int64), so a LoRA trained with alpha != rank would load at the
  wrong strength everywhere;
- keeps CLIP names as the live model spells them: transformers 5 flattened CLIPTextModel
  (`encoder.layers.0...` instead of `text_model.encoder.layers.0...`), while sd-scripts, WebUI and
  ComfyUI expect `lora_te_text_model_encoder_...`.
So the renaming is done here (it is one line); tests/test_kohya.py checks the UNet names against
that helper and checks the whole file by loading it with diffusers' own kohya loader.

Reading the file back: `pipe.load_lora_weights(folder, weight_name=...)` detects and converts it.
"""
import datetime
import json
import math
import numbers
import os

import torch

from lora_tools.config import UserError
from lora_tools.files import atomic_path

EXPORTER_VERSION = "1"  # bump when what this module writes changes
SD1_UNET_PREFIX = "lora_unet_"
SD1_TEXT_ENCODER_PREFIX = "lora_te_"

# How a LoRA pair is spelled in the state dicts we accept: PEFT's get_peft_model_state_dict, and
# what diffusers' convert_state_dict_to_diffusers turns some of those names into.
_DOWN_UP_SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight"),  # PEFT
    (".lora.down.weight", ".lora.up.weight"),  # diffusers, UNet attention (to_q.lora.down ...)
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),  # diffusers, CLIP attention
)


def _split_key(key):
    """'a.b.to_q.lora_A.weight' -> ('a.b.to_q', 'down'); None if it is not a LoRA A/B weight."""
    for down, up in _DOWN_UP_SUFFIXES:
        if key.endswith(down):
            return key[: -len(down)], "down"
        if key.endswith(up):
            return key[: -len(up)], "up"
    return None


def _modules(state_dict, strip_prefix, what):
    """{module path: {'down': A, 'up': B}} from a LoRA state dict, with strict checks."""
    modules = {}
    for key, tensor in state_dict.items():
        if key.startswith(strip_prefix):  # accept the 'unet.' / 'text_encoder.' file prefix too
            key = key[len(strip_prefix):]
        if "lora_magnitude_vector" in key or "dora_scale" in key:
            raise UserError(f"{what} LoRA uses DoRA ({key}): the kohya LoRA format has no DoRA term that diffusers, "
                            "WebUI and ComfyUI all read the same way, so no kohya file is written — use the diffusers file")
        split = _split_key(key)
        if split is None:
            raise ValueError(f"{what} state dict key {key!r} is not a LoRA A/B weight (expected a name ending in "
                             f"{', '.join(s for pair in _DOWN_UP_SUFFIXES for s in pair)}); biases, embeddings "
                             "and other adapter types have no kohya LoRA spelling")
        module, part = split
        if part in modules.setdefault(module, {}):
            raise ValueError(f"{what} state dict holds two {part} weights for {module}")
        modules[module][part] = tensor
    for module, parts in modules.items():
        if set(parts) != {"down", "up"}:
            raise ValueError(f"{what} LoRA module {module} has only its {'/'.join(parts)} weight")
        down, up = parts["down"], parts["up"]
        if down.ndim < 2 or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
            raise ValueError(f"{what} LoRA module {module}: A {tuple(down.shape)} and B {tuple(up.shape)} do not "
                             "make a rank-r product B @ A")
    return modules


def _check_alpha(alpha, what):
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        # alpha = 0 would also be read differently: sd-scripts treats it as "alpha = rank", diffusers as scale 0
        raise ValueError(f"{what} alpha must be a finite number > 0, got {alpha!r}")
    return float(alpha)


def kohya_module_name(module_path, part):
    """The kohya name of one adapted layer: part 'unet' or 'text_encoder' (SD1.x)."""
    if part == "unet":
        return SD1_UNET_PREFIX + module_path.replace(".", "_")
    if part == "text_encoder":
        # sd-scripts names CLIP layers from transformers' CLIPTextModel as it was before
        # transformers 5 flattened it: text_model.encoder.layers.N... — keep that spelling.
        if not module_path.startswith("text_model."):
            module_path = "text_model." + module_path
        return SD1_TEXT_ENCODER_PREFIX + module_path.replace(".", "_")
    raise ValueError(f"part must be 'unet' or 'text_encoder', got {part!r}")


def to_kohya(unet_sd, text_encoder_sd, unet_alpha, text_encoder_alpha, dtype=torch.float32, *, use_rslora=False):
    """LoRA state dicts in PEFT/diffusers naming -> one kohya-ss state dict (SD1.x).

    unet_sd / text_encoder_sd: `peft.utils.get_peft_model_state_dict(model)` of the UNet / the CLIP
    text encoder (keys like 'down_blocks.0...attn1.to_q.lora_A.weight', 'text_model.encoder.layers.0.
    self_attn.q_proj.lora_A.weight' or, with transformers 5, 'encoder.layers.0...'); a 'unet.' /
    'text_encoder.' prefix and diffusers' 'lora.down'/'lora_linear_layer.down' spellings are accepted.
    text_encoder_sd may be None or empty (UNet-only LoRA); then text_encoder_alpha is ignored.
    unet_alpha / text_encoder_alpha: PEFT's lora_alpha of each model (one value for all its layers;
    each layer's rank comes from its tensors, so PEFT rank_pattern is fine, alpha_pattern is not).
    use_rslora: the adapters were trained with PEFT use_rslora=True (scale alpha/sqrt(r)); kohya
    files always mean alpha/r, so alpha*sqrt(r) is written, which gives the same update.
    Returns {name: tensor}: lora_down.weight, lora_up.weight and a 0-dim .alpha per layer, all in
    `dtype`, on the CPU, contiguous, not sharing memory with the model.
    """
    parts = [("unet", unet_sd or {}, unet_alpha)]
    if text_encoder_sd:
        parts.append(("text_encoder", text_encoder_sd, text_encoder_alpha))
    if not any(sd for _, sd, _ in parts):
        raise ValueError("no LoRA weights to convert: both state dicts are empty")
    out = {}
    for part, sd, alpha in parts:
        if not sd:
            continue
        alpha = _check_alpha(alpha, part)
        for module, w in sorted(_modules(sd, part + ".", part).items()):
            name = kohya_module_name(module, part)
            if name + ".lora_down.weight" in out:
                raise ValueError(f"two {part} modules map to the kohya name {name}")
            rank = w["down"].shape[0]
            written_alpha = alpha * math.sqrt(rank) if use_rslora else alpha
            out[name + ".lora_down.weight"] = w["down"].detach().to("cpu", dtype).contiguous().clone()
            out[name + ".lora_up.weight"] = w["up"].detach().to("cpu", dtype).contiguous().clone()
            out[name + ".alpha"] = torch.tensor(written_alpha, dtype=dtype)  # 0-dim, like sd-scripts
    return out


# ----------------------------------------------------------------------------- metadata
# The training facts kohya_metadata understands (all optional), and the sd-scripts key each feeds.
# Semantics follow kohya-ss/sd-scripts train_network.py, which str()s every value.
_SS_KEYS = {
    "base_model": "ss_sd_model_name",  # hub id, or a local path (its last component is written)
    "output_name": "ss_output_name",
    "rank": "ss_network_dim",
    "alpha": "ss_network_alpha",  # lora_alpha as trained (with rsLoRA the .alpha tensors hold alpha*sqrt(r))
    "dropout": "ss_network_dropout",
    "learning_rate": "ss_learning_rate",
    "unet_lr": "ss_unet_lr",
    "text_encoder_lr": "ss_text_encoder_lr",
    "lr_scheduler": "ss_lr_scheduler",
    "lr_warmup_steps": "ss_lr_warmup_steps",
    "optimizer": "ss_optimizer",
    "max_grad_norm": "ss_max_grad_norm",
    "max_train_steps": "ss_max_train_steps",
    "steps": "ss_steps",  # optimizer steps done when the file was written
    "epoch": "ss_epoch",  # epochs done (1-based) when the file was written
    "num_epochs": "ss_num_epochs",
    "batch_size": "ss_batch_size_per_device",
    "gradient_accumulation_steps": "ss_gradient_accumulation_steps",
    "num_train_images": "ss_num_train_images",
    "num_batches_per_epoch": "ss_num_batches_per_epoch",
    "seed": "ss_seed",
    "mixed_precision": "ss_mixed_precision",  # "no" | "fp16" | "bf16"
    "gradient_checkpointing": "ss_gradient_checkpointing",
    "cache_latents": "ss_cache_latents",
    "flip_aug": "ss_flip_aug",
    "training_started_at": "ss_training_started_at",  # unix time (time.time())
    "training_finished_at": "ss_training_finished_at",
}
_OTHER_KEYS = {
    "resolution",  # int or (width, height) -> ss_resolution "(512, 512)", modelspec.resolution "512x512"
    "dataset",  # dataset folder or hub name -> ss_dataset_dirs {name: {"n_repeats": 1, "img_count": N}}
    "network_args",  # dict (target modules, use_dora, use_rslora, ...) -> ss_network_args JSON
    "prediction_type",  # "epsilon" | "v_prediction" -> modelspec.prediction_type "epsilon" | "v"
    "title",  # modelspec.title; default output_name, else "LoRA@<training_finished_at>"
    "version",  # our own version string -> lora_complete_example_version
}
KNOWN_INFO_KEYS = frozenset(_SS_KEYS) | _OTHER_KEYS
# Other spellings of the same facts.
_ALIASES = {"num_images": "num_train_images", "started_at": "training_started_at",
            "finished_at": "training_finished_at"}


def facts_from_config(config):
    """The training facts in lora_complete_example's settings (cfg.as_dict(): UPPER_CASE keys).
    Settings without an sd-scripts counterpart are ignored; so are values that are not facts of the
    run: NUM_EPOCHS when MAX_TRAIN_STEPS wins, MIXED_PRECISION="auto" (resolved only at run time)."""
    c = config
    facts = {
        "base_model": c.get("MODEL_ID"),
        "output_name": c.get("OUTPUT_NAME"),
        "rank": c.get("LORA_RANK"),
        "alpha": c.get("LORA_ALPHA"),
        "dropout": c.get("LORA_DROPOUT"),
        "learning_rate": c.get("LEARNING_RATE"),
        "unet_lr": c.get("LEARNING_RATE"),
        "lr_scheduler": c.get("LR_SCHEDULER"),
        "lr_warmup_steps": c.get("LR_WARMUP_STEPS"),
        "max_grad_norm": c.get("MAX_GRAD_NORM"),
        "max_train_steps": c.get("MAX_TRAIN_STEPS"),
        "num_epochs": c.get("NUM_EPOCHS") if c.get("MAX_TRAIN_STEPS") is None else None,
        "batch_size": c.get("BATCH_SIZE"),
        "gradient_accumulation_steps": c.get("GRADIENT_ACCUMULATION_STEPS"),
        "seed": c.get("SEED"),
        "mixed_precision": c.get("MIXED_PRECISION") if c.get("MIXED_PRECISION") != "auto" else None,
        "gradient_checkpointing": c.get("GRADIENT_CHECKPOINTING"),
        "cache_latents": c.get("CACHE_LATENTS"),
        "flip_aug": c.get("RANDOM_FLIP"),
        "resolution": c.get("RESOLUTION"),
        "dataset": c.get("DATA_DIR") or c.get("DATASET_NAME"),
    }
    if c.get("TRAIN_TEXT_ENCODER"):
        facts["text_encoder_lr"] = c.get("TEXT_ENCODER_LEARNING_RATE") or c.get("LEARNING_RATE")
    args = {k.lower(): c[k] for k in ("TARGET_MODULES", "USE_DORA", "USE_RSLORA", "TRAIN_TEXT_ENCODER") if k in c}
    if c.get("TRAIN_TEXT_ENCODER") and "TEXT_ENCODER_TARGET_MODULES" in c:
        args["text_encoder_target_modules"] = c["TEXT_ENCODER_TARGET_MODULES"]
    if c.get("LORAPLUS_LR_RATIO") is not None:
        args["loraplus_lr_ratio"] = c["LORAPLUS_LR_RATIO"]
    if args:
        facts["network_args"] = args
    return {k: v for k, v in facts.items() if v is not None}


def _library_versions():
    versions = {}
    for name in ("torch", "diffusers", "peft", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # pragma: no cover - a missing optional library
            pass
    return versions


def kohya_metadata(info):
    """safetensors metadata (all str) that WebUI/ComfyUI show for a kohya LoRA, from training facts.

    `info` keys: see KNOWN_INFO_KEYS (an unknown key is an error, so a typo is not silently
    dropped; num_images / started_at / finished_at are accepted for num_train_images /
    training_started_at / training_finished_at); None values are left out. UPPER_CASE keys are
    lora_complete_example settings (cfg.as_dict()), read by facts_from_config; lower-case facts win,
    so `kohya_metadata(dict(cfg.as_dict(), steps=..., num_images=..., finished_at=...))` works. Always written: ss_base_model_version "sd_v1", ss_v2
    "False", ss_network_module "networks.lora", the ModelSpec 1.0.0 keys sd-scripts writes for an
    SD1.x LoRA (modelspec.sai_model_spec / architecture "stable-diffusion-v1/lora" / implementation
    "diffusers" / title; date, resolution and prediction_type when known), and
    lora_complete_example_version.
    """
    facts = {_ALIASES.get(k, k): v for k, v in info.items() if not k.isupper()}
    unknown = sorted(set(facts) - KNOWN_INFO_KEYS)
    if unknown:
        raise ValueError(f"kohya_metadata: unknown keys {unknown}; known: {sorted(KNOWN_INFO_KEYS | set(_ALIASES))} "
                         "and lora_complete_example's UPPER_CASE settings")
    info = {**facts_from_config({k: v for k, v in info.items() if k.isupper()}),
            **{k: v for k, v in facts.items() if v is not None}}
    meta = {
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_network_module": "networks.lora",
    }
    for key, ss_key in _SS_KEYS.items():
        if key in info:
            meta[ss_key] = str(info[key])  # sd-scripts: str(v), e.g. alpha 8.0 -> "8.0"
    if "base_model" in info:
        name = str(info["base_model"])
        if os.path.exists(name):  # sd-scripts writes a local model's file/folder name, not the full path
            name = os.path.basename(os.path.normpath(name))
        meta["ss_sd_model_name"] = name
    if "resolution" in info:
        res = info["resolution"]
        w, h = (res, res) if isinstance(res, int) else tuple(int(x) for x in res)
        meta["ss_resolution"] = str((w, h))  # sd-scripts: str(tuple) -> "(512, 512)"
        meta["modelspec.resolution"] = f"{w}x{h}"
    if "dataset" in info:
        name = str(info["dataset"])
        if os.path.exists(name):
            name = os.path.basename(os.path.normpath(name))
        entry = {"n_repeats": 1}
        if "num_train_images" in info:
            entry["img_count"] = int(info["num_train_images"])
        meta["ss_dataset_dirs"] = json.dumps({name: entry})
    if "network_args" in info:
        meta["ss_network_args"] = json.dumps(info["network_args"], sort_keys=True, default=str)

    meta["modelspec.sai_model_spec"] = "1.0.0"
    meta["modelspec.architecture"] = "stable-diffusion-v1/lora"
    meta["modelspec.implementation"] = "diffusers"  # what sd-scripts writes for an SD1.x LoRA
    finished = info.get("training_finished_at")
    title = info.get("title") or info.get("output_name") or (f"LoRA@{finished}" if finished is not None else "LoRA")
    meta["modelspec.title"] = str(title)
    if finished is not None:  # sd-scripts: datetime.fromtimestamp(int(ts)).isoformat()
        meta["modelspec.date"] = datetime.datetime.fromtimestamp(int(finished)).isoformat()
    if "prediction_type" in info:
        kinds = {"epsilon": "epsilon", "v_prediction": "v", "v": "v"}
        if info["prediction_type"] not in kinds:
            raise ValueError(f"prediction_type {info['prediction_type']!r}: expected one of {sorted(kinds)}")
        meta["modelspec.prediction_type"] = kinds[info["prediction_type"]]

    versions = ", ".join(f"{k} {v}" for k, v in _library_versions().items())
    meta["lora_complete_example_version"] = str(info.get("version", f"kohya-export/{EXPORTER_VERSION} ({versions})"))
    bad = [k for k, v in meta.items() if not isinstance(v, str)]
    assert not bad, bad
    return meta


# ----------------------------------------------------------------------------- file
def save_kohya_file(path, unet_sd, te_sd, unet_alpha, te_alpha, metadata, dtype=torch.float32, *, use_rslora=False):
    """Write the kohya file atomically (the old file stays until the new one is complete).
    Refuses (UserError) if any tensor is NaN/inf after the cast to `dtype` — an fp32 value past
    fp16's 65504 would become inf only there. Returns the number of parameters written."""
    from safetensors.torch import save_file

    tensors = to_kohya(unet_sd, te_sd, unet_alpha, te_alpha, dtype, use_rslora=use_rslora)
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{len(bad)} LoRA tensors hold NaN/inf in {str(dtype).replace('torch.', '')} (e.g. {bad[0]}), "
                        f"so {path} was not written" + (" — try saving in fp32 or bf16" if dtype == torch.float16 else ""))
    metadata = dict(metadata or {})
    wrong = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if wrong:
        raise ValueError(f"safetensors metadata must be str -> str; not: {wrong}")
    metadata.setdefault("format", "pt")
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return sum(v.numel() for k, v in tensors.items() if not k.endswith(".alpha"))
