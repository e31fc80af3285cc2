"""Fail fast: every setting and every local path is checked before anything slow starts (model
download, image decoding, caching), and a mistake is one line saying what, why and how to fix it.
"""
import importlib.util
import os
import tempfile

from lora_tools.config import UserError

MIXED_PRECISION_CHOICES = ("auto", "no", "fp16", "bf16")
LR_SCHEDULER_CHOICES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def need(ok, message):
    if not ok:
        raise UserError(message)


def check_number(c, name, low, kind=(int, float), strict=False, none_ok=False):
    """c[name] is a number (an integer: kind=int) >= low (> low: strict), or None where none_ok."""
    v = c[name]
    if v is None and none_ok:
        return
    ok = isinstance(v, kind) and not isinstance(v, bool) and (v > low if strict else v >= low)
    what = "an integer" if kind is int else "a number"
    need(ok, f"{name} must be {what} {'>' if strict else '>='} {low}{' or None' if none_ok else ''}, got {v!r}")


def check_config(c):
    """Check every setting's value (c: the dict of resolved settings). Raises UserError."""

    def number(name, *args, **kwargs):
        check_number(c, name, *args, **kwargs)

    for name in ("LORA_RANK", "BATCH_SIZE", "GRADIENT_ACCUMULATION_STEPS", "NUM_EPOCHS", "NUM_INFERENCE_STEPS",
                 "LOG_EVERY", "NUM_VALIDATION_SEEDS"):
        number(name, 1, int)
    number("LR_WARMUP_STEPS", 0, int)
    for name in ("MAX_TRAIN_STEPS", "MAX_TRAIN_SAMPLES", "CHECKPOINTING_STEPS", "CHECKPOINTS_TOTAL_LIMIT", "VALIDATION_STEPS"):
        number(name, 1, int, none_ok=True)
    number("DATALOADER_NUM_WORKERS", 0, int, none_ok=True)
    number("RESOLUTION", 8, int, none_ok=True)
    need(c["RESOLUTION"] is None or c["RESOLUTION"] % 8 == 0,
         f"RESOLUTION must be a positive multiple of 8 (the VAE downsamples by 8), got {c['RESOLUTION']} — "
         f"try {max(64, round((c['RESOLUTION'] or 512) / 64) * 64)}, or None for the model's own size")
    for name in ("LEARNING_RATE", "LORA_ALPHA"):
        number(name, 0, strict=True)
    for name in ("TEXT_ENCODER_LEARNING_RATE", "LORAPLUS_LR_RATIO", "SNR_GAMMA", "MAX_GRAD_NORM"):
        number(name, 0, strict=True, none_ok=True)
    for name in ("LORA_DROPOUT", "ADAM_WEIGHT_DECAY", "GUIDANCE_SCALE", "NOISE_OFFSET"):
        number(name, 0)
    need(c["LORA_DROPOUT"] < 1, f"LORA_DROPOUT must be in [0, 1), got {c['LORA_DROPOUT']}")
    number("CAPTION_DROPOUT", 0)
    need(c["CAPTION_DROPOUT"] < 1, f"CAPTION_DROPOUT must be in [0, 1), got {c['CAPTION_DROPOUT']} — e.g. 0.1")
    split = c["VALIDATION_SPLIT"]
    need(split is None or not isinstance(split, bool) and (isinstance(split, float) and 0 < split < 1
                                                          or isinstance(split, int) and split >= 1),
         f"VALIDATION_SPLIT must be a fraction in (0, 1), a number of images >= 1, or None, got {split!r} — e.g. 0.1 or 20")
    number("VALIDATION_LOSS_STEPS", 1, int)
    number("KEEP_TAGS", 0, int)
    number("BUCKET_STEP", 8, int)
    need(c["BUCKET_STEP"] % 8 == 0, f"BUCKET_STEP must be a multiple of 8 (the VAE downsamples by 8), got "
                                    f"{c['BUCKET_STEP']} — 64 suits every SD and SDXL UNet")
    need(isinstance(c["SEED"], int) and not isinstance(c["SEED"], bool), f"SEED must be an integer, got {c['SEED']!r}")
    need(c["SAVE_DTYPE"] in ("fp32", "fp16"), f"SAVE_DTYPE must be 'fp32' or 'fp16', got {c['SAVE_DTYPE']!r}")
    need(bool(c["OUTPUT_NAME"]) and os.sep not in c["OUTPUT_NAME"] and c["OUTPUT_NAME"] != "pytorch_lora_weights",
         f"OUTPUT_NAME must be a plain file name (no folders, not pytorch_lora_weights), got {c['OUTPUT_NAME']!r}")
    need(c["REPORT_TO"] in (None, "tensorboard"), f"REPORT_TO must be None or 'tensorboard', got {c['REPORT_TO']!r}")
    need(c["MIXED_PRECISION"] in MIXED_PRECISION_CHOICES, f"MIXED_PRECISION must be one of {MIXED_PRECISION_CHOICES}, got {c['MIXED_PRECISION']!r}")
    need(c["LR_SCHEDULER"] in LR_SCHEDULER_CHOICES, f"LR_SCHEDULER must be one of {LR_SCHEDULER_CHOICES}, got {c['LR_SCHEDULER']!r}")
    for name, example in (("TARGET_MODULES", "to_q,to_k,to_v,to_out.0"), ("TEXT_ENCODER_TARGET_MODULES", "q_proj,k_proj,v_proj,out_proj"),
                          ("VALIDATION_PROMPTS", "'a red circle','a blue square'")):
        need(len(c[name]) > 0 and all(isinstance(m, str) and m for m in c[name]),
             f"{name} must be a non-empty list of names, got {c[name]!r} — e.g. --{name}={example}")
    need(c["CENTER_CROP"] or not c["CACHE_LATENTS"],
         "CENTER_CROP=False (random crops) cannot use the latent cache, which stores one crop per image — "
         "set --CENTER_CROP=True (fast) or --CACHE_LATENTS=False (encodes every step, slower)")
    for name in ("DATA_DIR", "IMAGE_COLUMN", "CAPTION_COLUMN", "REVISION", "RESUME_FROM"):
        need(c[name] is None or (isinstance(c[name], str) and c[name] != ""), f"{name} must be text or None, got {c[name]!r}")
    need(bool(c["OUTPUT_DIR"]), "OUTPUT_DIR must not be empty")


def check_dreambooth(c):
    """lora_dreambooth_example.py's INSTANCE_PROMPT, CLASS_PROMPT, NEW_TOKEN and friends: values, and
    prompts that fit together."""

    def number(name, *args, **kwargs):
        check_number(c, name, *args, **kwargs)

    for name in ("INSTANCE_PROMPT", "CLASS_PROMPT", "CLASS_DATA_DIR", "NEW_TOKEN", "NEW_TOKEN_INIT_WORD"):
        need(c[name] is None or (isinstance(c[name], str) and c[name].strip() != ""), f"{name} must be text or None, got {c[name]!r}")
    number("NUM_CLASS_IMAGES", 1, int)
    number("NUM_NEW_TOKEN_VECTORS", 1, int)
    number("PRIOR_LOSS_WEIGHT", 0)
    number("EMBEDDING_LEARNING_RATE", 0, strict=True)
    need(not c["ASPECT_RATIO_BUCKETING"], "ASPECT_RATIO_BUCKETING is for lora_complete_example.py: a subject's "
         "pictures and the class pictures train in pairs of one size — drop --ASPECT_RATIO_BUCKETING")
    need(not c["SHUFFLE_CAPTION_TAGS"], "SHUFFLE_CAPTION_TAGS is for lora_complete_example.py: here every picture "
         "trains with INSTANCE_PROMPT — drop --SHUFFLE_CAPTION_TAGS")
    need(c["VALIDATION_SPLIT"] is None, "VALIDATION_SPLIT is for lora_complete_example.py: a subject's few pictures "
         "are all needed for training — drop --VALIDATION_SPLIT and judge by the validation pictures")
    instance, klass, token = c["INSTANCE_PROMPT"], c["CLASS_PROMPT"], c["NEW_TOKEN"]
    need(c["CLASS_DATA_DIR"] is None or klass is not None,
         "CLASS_DATA_DIR is only read with prior preservation — also set --CLASS_PROMPT (e.g. 'a photo of a dog'), or drop --CLASS_DATA_DIR")
    need(klass is None or klass != instance,
         f"CLASS_PROMPT must differ from INSTANCE_PROMPT (both are {klass!r}): the class prompt names the class without the subject's identifier")
    if token is not None:
        need(len(token.split()) == 1, f"NEW_TOKEN must be one word without spaces, got {token!r} — e.g. --NEW_TOKEN='<zwx>'")
        need(instance is None or token in instance,
             f"NEW_TOKEN {token!r} is not in INSTANCE_PROMPT {instance!r}, so it would never be trained — e.g. --INSTANCE_PROMPT='a photo of {token} dog'")
        need(klass is None or token not in klass,
             f"CLASS_PROMPT {klass!r} holds NEW_TOKEN {token!r}: the class prompt must describe the class without the subject")


def check_paths(cfg):
    """The local folders the run reads."""
    for name in ("DATA_DIR",):  # CLASS_DATA_DIR may not exist yet: the class pictures are drawn into it
        if getattr(cfg, name) is not None and not os.path.isdir(getattr(cfg, name)):
            raise UserError(f"{name}={getattr(cfg, name)!r} does not exist or is not a folder — point --{name} at a folder of images")
    model = cfg.MODEL_ID
    looks_local = os.path.isabs(model) or model.startswith(".") or model.count("/") != 1
    if (os.path.exists(model) or looks_local) and not os.path.isfile(os.path.join(model, "unet", "config.json")):
        raise UserError(f"MODEL_ID={model!r} is not a diffusers-layout model folder (no unet/config.json there) — pass a folder "
                        "with unet/, vae/, text_encoder/, tokenizer/, scheduler/, or a hub id like stable-diffusion-v1-5/stable-diffusion-v1-5")


def check_environment(cfg):
    """Optional packages that a setting needs: missing ones are found now, not mid-run."""
    needs = [(cfg.USE_8BIT_ADAM, "bitsandbytes", "USE_8BIT_ADAM=True"), (cfg.REPORT_TO == "tensorboard", "tensorboard", "REPORT_TO='tensorboard'")]
    for wanted, package, setting in needs:
        if wanted and importlib.util.find_spec(package) is None:
            raise UserError(f"{setting} needs the {package} package, which is optional — pip install {package}, or turn the setting off")


def check_output_dir(path):
    """Fail now, not after hours of training, if the results cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"OUTPUT_DIR={path!r} is not writable ({e.strerror}) — pick another --OUTPUT_DIR or fix its permissions") from None


def explain_load_error(setting, name, error):
    """One line on why a hub download or a local load failed, and what to do."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if os.path.isdir(name):
        return f"{setting}={name!r}: could not load from this folder ({text})"
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return (f"{setting}={name!r} is not in the local hub cache and HF_HUB_OFFLINE=1 forbids downloading — "
                f"unset HF_HUB_OFFLINE, or download it once and pass its local folder")
    names = type(error).__name__ + " " + text
    if any(k in names for k in ("RepositoryNotFound", "GatedRepo", "401", "403", "404")):
        return (f"{setting}={name!r} was not found on the hub, or it is private/gated — check the spelling, accept "
                f"its licence on the hub, and log in (hf auth login, or set HF_TOKEN)")
    return (f"{setting}={name!r} could not be fetched: the hub is unreachable ({text}) — check the network or proxy, "
            f"or download it elsewhere and pass its local folder")


def check_demo_base(path):
    """The demo's pretrained base model ships in the repository (demo_base/); say how to rebuild it if it is gone."""
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise UserError(f"the demo's base model {path} is missing — restore it (git checkout -- demo_base) "
                        f"or rebuild it with the command at the top of lora_tools/demo_base.py (about an hour on a 2-core CPU)")
