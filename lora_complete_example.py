"""
LoRA fine-tuning of Stable Diffusion, end to end, in one readable file.

It loads Stable Diffusion, freezes all of it, adds small trainable low-rank matrices (LoRA) to the
UNet's attention projections, trains them with the denoising objective, saves them as one small
safetensors file that diffusers loads, and renders a test image from base model + LoRA.

Usage (every constant below can be overridden as --NAME=value, spelled exactly like the constant):

    # offline demo on a CPU, ~1 minute: a tiny random-weight SD-shaped model (its image is noise)
    python lora_complete_example.py --DEMO=True

    # the real run: downloads SD1.5 and the Naruto captions dataset, trains on the visible GPU
    python lora_complete_example.py

    # pick the GPU, your own images (a folder with metadata.jsonl or .txt captions), other knobs
    CUDA_VISIBLE_DEVICES=1 python lora_complete_example.py --DATA_DIR=./my_images --LORA_RANK=8

    # several GPUs, data-parallel
    accelerate launch --multi_gpu --num_processes 2 lora_complete_example.py

Writes to OUTPUT_DIR: pytorch_lora_weights.safetensors (the adapter in diffusers' format, with its
rank/alpha metadata), <OUTPUT_NAME>.safetensors (the same adapter for Stable Diffusion WebUI and
ComfyUI), training_config.json, test_generation.png, comparison.png (without/with the LoRA),
metrics.jsonl + loss_curve.png, rank_spectrum.png, and checkpoint-<step>/ folders to resume from.
The numbered sections follow diffusion_lora_finetuning_tutorial.md chapter 4.
"""
import gc
import json
import math
import os
import sys
import time

import torch
from torch.nn.functional import mse_loss

from lora_tools.config import Config, UserError, parse_overrides
from lora_tools.files import atomic_path, atomic_write_text

# =============================================================================
# 1. Configuration
# =============================================================================
# model
MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id, or a local folder in diffusers layout
REVISION = None  # hub branch/tag/commit of MODEL_ID; None = main
# data
DATASET_NAME = "lambdalabs/naruto-blip-captions"  # hub dataset with an image and a caption column
DATA_DIR = None  # local folder (imagefolder with metadata.jsonl/.csv, or images + same-name .txt); wins over DATASET_NAME
IMAGE_COLUMN = None  # column holding the images; None = guess ("image", ...)
CAPTION_COLUMN = None  # column holding the captions; None = guess ("text", "caption", ...)
MAX_TRAIN_SAMPLES = None  # use only the first N images (quick experiments); None = all
RESOLUTION = 512  # training size in pixels, a multiple of 8 (512 is SD1.5's native size)
CENTER_CROP = True  # True = center crop after resizing; False = random crop (needs CACHE_LATENTS=False)
RANDOM_FLIP = True  # random horizontal flips (a cheap 2x augmentation)
CACHE_LATENTS = True  # encode every image and caption once, before training (the encoders are frozen)
DATALOADER_NUM_WORKERS = None  # worker processes for image decoding; None = 0 with the cache, else min(4, cores - 1)
# lora
LORA_RANK = 4  # r: rank of B·A; 4-16 is typical, higher = more capacity and a bigger file
LORA_ALPHA = 4  # α: the update is scaled by α/r; α = r is a neutral start
LORA_DROPOUT = 0.0  # dropout on the LoRA branch's input; 0.05-0.1 against overfitting on few images
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]  # UNet attention projections that get adapters
USE_DORA = False  # DoRA (Liu et al. 2024): also learn each column's magnitude; a little slower per step
USE_RSLORA = False  # rsLoRA (Kalajdzievski 2023): scale by α/√r instead of α/r, so high ranks keep learning
TRAIN_TEXT_ENCODER = False  # also put LoRA on the CLIP text encoder (prompts can't then be cached)
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP attention projections
# optimisation
LEARNING_RATE = 1e-4  # AdamW step size for the LoRA weights (the HF LoRA blog: 1e-4, vs ~1e-6 for full fine-tuning)
TEXT_ENCODER_LEARNING_RATE = None  # for the text encoder's LoRA; None = LEARNING_RATE (often set 2-10x lower)
LORAPLUS_LR_RATIO = None  # LoRA+ (Hayou et al. 2024): B matrices learn at LEARNING_RATE x this (> 1); None = off
SNR_GAMMA = None  # Min-SNR-γ loss weighting (Hang et al. 2023); 5.0 is the paper's default; None = plain MSE
NOISE_OFFSET = 0.0  # offset noise (Guttenberg 2023): adds this x N(0,1) per image and channel; 0.05-0.1 helps very dark/bright images
BATCH_SIZE = 1  # images per GPU per forward pass
GRADIENT_ACCUMULATION_STEPS = 4  # forward passes per optimizer step; effective batch = BATCH_SIZE x this x GPUs
NUM_EPOCHS = 10  # passes over the data (ignored when MAX_TRAIN_STEPS is set)
MAX_TRAIN_STEPS = None  # optimizer steps in total; None = NUM_EPOCHS worth; when set it wins
LR_SCHEDULER = "constant"  # constant | constant_with_warmup | linear | cosine | cosine_with_restarts | polynomial
LR_WARMUP_STEPS = 0  # optimizer steps of linear warm-up from 0 to LEARNING_RATE
MAX_GRAD_NORM = 1.0  # clip the LoRA gradients' global L2 norm to this; None = no clipping
ADAM_WEIGHT_DECAY = 1e-2  # AdamW decoupled weight decay
MIXED_PRECISION = "auto"  # auto | no | fp16 | bf16; auto = bf16 where the GPU has it, else fp16; fp32 on a CPU
ALLOW_TF32 = True  # TF32 tensor cores for fp32 matmuls on Ampere+ GPUs (faster; 10-bit mantissa instead of 23)
VAE_FP32 = False  # keep the VAE in fp32 under fp16 (the SD VAE can overflow to NaN in fp16)
GRADIENT_CHECKPOINTING = False  # recompute UNet activations in backward: less memory, more compute (see benchmarks/)
USE_8BIT_ADAM = False  # bitsandbytes 8-bit AdamW states (pip install bitsandbytes; GPU only)
COMPILE = False  # torch.compile the UNet (slow first step, faster after)
SEED = 42  # seeds data order, noise, timesteps, LoRA init and the test image
LOG_EVERY = 10  # read the loss back from the GPU every N optimizer steps (each read is a sync)
# checkpoints
CHECKPOINTING_STEPS = 500  # save a resumable OUTPUT_DIR/checkpoint-<step>/ every N optimizer steps; None = never
CHECKPOINTS_TOTAL_LIMIT = None  # keep only the newest N checkpoints; None = keep all
RESUME_FROM = None  # "latest" (newest checkpoint in OUTPUT_DIR) or a checkpoint-<step> folder; None = fresh start
# output
OUTPUT_DIR = "my_lora_model"  # where the adapter, config and test image go
OUTPUT_NAME = "my_lora"  # the WebUI/ComfyUI copy is OUTPUT_DIR/<OUTPUT_NAME>.safetensors
SAVE_DTYPE = "fp32"  # fp32 | fp16: precision of the saved LoRA files (fp16 halves their size)
SAVE_MERGED_MODEL = False  # also save base + LoRA fused (W = W0 + (α/r)·B·A) as a full pipeline in OUTPUT_DIR/merged_pipeline
VALIDATION_PROMPT = "a man with blue eyes, in the style of naruto"  # test_generation.png, rendered after training
VALIDATION_PROMPTS = ["a man with blue eyes, in the style of naruto", "a girl with pink hair, in the style of naruto"]  # grids and comparison.png
NUM_VALIDATION_SEEDS = 2  # images per prompt in the validation grids (seeds SEED, SEED+1, ...)
VALIDATION_STEPS = None  # render a grid into OUTPUT_DIR/validation/ every N steps; None = only at the end
REPORT_TO = None  # "tensorboard": also log loss and lr through accelerate's trackers (pip install tensorboard)
NUM_INFERENCE_STEPS = 30  # denoising steps for the test image
GUIDANCE_SCALE = 7.5  # classifier-free guidance for the test image
DEMO = False  # True = offline demo: tiny random SD-shaped model and generated pictures (see below)

CONFIG_KEYS = [k for k in list(globals()) if k.isupper()]  # everything above, in order

# DEMO=True swaps in these values (any you also give on the command line win). The training code
# below has no demo branches: the demo is a real run on a tiny model built from configs.
DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".demo_cache")
demo_settings = dict(
    MODEL_ID=os.path.join(DEMO_DIR, "tiny-sd-pipeline"),
    DATA_DIR=os.path.join(DEMO_DIR, "shapes-dataset"),
    RESOLUTION=64,
    BATCH_SIZE=4,
    GRADIENT_ACCUMULATION_STEPS=1,
    MAX_TRAIN_STEPS=60,
    LEARNING_RATE=1e-3,
    LR_WARMUP_STEPS=0,
    LOG_EVERY=5,
    NUM_INFERENCE_STEPS=10,
    VALIDATION_PROMPT="a red circle on a blue background",
    VALIDATION_PROMPTS=["a red circle on a blue background", "a green square on a yellow background"],
)

MIXED_PRECISION_CHOICES = ("auto", "no", "fp16", "bf16")
LR_SCHEDULER_CHOICES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def print0(*args, **kwargs):
    """print on the main process only (accelerate sets RANK in each process it launches)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def resolve_config(argv, defaults=None):
    """Defaults from the block above + DEMO values + --NAME=value overrides -> a frozen, checked Config."""
    defaults = defaults or {k: globals()[k] for k in CONFIG_KEYS}
    values = parse_overrides(argv, defaults, log=print0)
    if values["DEMO"]:
        given = {a[2:].split("=", 1)[0] for a in argv}
        values.update({k: v for k, v in demo_settings.items() if k not in given})
    check_config(values)
    return Config(values)


def check_config(c):
    """Check every setting's value before any slow work. Raises UserError: what, why, how to fix."""

    def need(ok, message):
        if not ok:
            raise UserError(message)

    def number(name, low, kind=(int, float), strict=False, none_ok=False):
        v = c[name]
        if v is None and none_ok:
            return
        ok = isinstance(v, kind) and not isinstance(v, bool) and (v > low if strict else v >= low)
        what = "an integer" if kind is int else "a number"
        need(ok, f"{name} must be {what} {'>' if strict else '>='} {low}{' or None' if none_ok else ''}, got {v!r}")

    for name in ("LORA_RANK", "BATCH_SIZE", "GRADIENT_ACCUMULATION_STEPS", "NUM_EPOCHS", "NUM_INFERENCE_STEPS", "LOG_EVERY"):
        number(name, 1, int)
    number("LR_WARMUP_STEPS", 0, int)
    for name in ("MAX_TRAIN_STEPS", "MAX_TRAIN_SAMPLES", "CHECKPOINTING_STEPS", "CHECKPOINTS_TOTAL_LIMIT"):
        number(name, 1, int, none_ok=True)
    number("DATALOADER_NUM_WORKERS", 0, int, none_ok=True)
    number("RESOLUTION", 8, int)
    need(c["RESOLUTION"] % 8 == 0,
         f"RESOLUTION must be a positive multiple of 8 (the VAE downsamples by 8), got {c['RESOLUTION']} — try {max(64, round(c['RESOLUTION'] / 64) * 64)}")
    number("LEARNING_RATE", 0, strict=True)
    number("LORA_ALPHA", 0, strict=True)
    number("LORA_DROPOUT", 0)
    need(c["LORA_DROPOUT"] < 1, f"LORA_DROPOUT must be in [0, 1), got {c['LORA_DROPOUT']}")
    number("ADAM_WEIGHT_DECAY", 0)
    number("GUIDANCE_SCALE", 0)
    number("MAX_GRAD_NORM", 0, strict=True, none_ok=True)
    need(isinstance(c["SEED"], int), f"SEED must be an integer, got {c['SEED']!r}")
    number("TEXT_ENCODER_LEARNING_RATE", 0, strict=True, none_ok=True)
    number("LORAPLUS_LR_RATIO", 0, strict=True, none_ok=True)
    number("SNR_GAMMA", 0, strict=True, none_ok=True)
    number("NOISE_OFFSET", 0)
    need(c["SAVE_DTYPE"] in ("fp32", "fp16"), f"SAVE_DTYPE must be 'fp32' or 'fp16', got {c['SAVE_DTYPE']!r}")
    need(bool(c["OUTPUT_NAME"]) and os.sep not in c["OUTPUT_NAME"] and c["OUTPUT_NAME"] != "pytorch_lora_weights",
         f"OUTPUT_NAME must be a plain file name (no folders, not pytorch_lora_weights), got {c['OUTPUT_NAME']!r}")
    need(len(c["TEXT_ENCODER_TARGET_MODULES"]) > 0, "TEXT_ENCODER_TARGET_MODULES must not be empty — e.g. q_proj,k_proj,v_proj,out_proj")
    need(len(c["VALIDATION_PROMPTS"]) > 0 and all(isinstance(p, str) for p in c["VALIDATION_PROMPTS"]),
         f"VALIDATION_PROMPTS must be a non-empty list of prompts, got {c['VALIDATION_PROMPTS']!r}")
    number("NUM_VALIDATION_SEEDS", 1, int)
    number("VALIDATION_STEPS", 1, int, none_ok=True)
    need(c["REPORT_TO"] in (None, "tensorboard"), f"REPORT_TO must be None or 'tensorboard', got {c['REPORT_TO']!r}")
    need(c["MIXED_PRECISION"] in MIXED_PRECISION_CHOICES, f"MIXED_PRECISION must be one of {MIXED_PRECISION_CHOICES}, got {c['MIXED_PRECISION']!r}")
    need(c["LR_SCHEDULER"] in LR_SCHEDULER_CHOICES, f"LR_SCHEDULER must be one of {LR_SCHEDULER_CHOICES}, got {c['LR_SCHEDULER']!r}")
    need(len(c["TARGET_MODULES"]) > 0 and all(isinstance(m, str) for m in c["TARGET_MODULES"]),
         f"TARGET_MODULES must be a non-empty list of module names, got {c['TARGET_MODULES']!r} — e.g. --TARGET_MODULES=to_q,to_v")
    need(c["CENTER_CROP"] or not c["CACHE_LATENTS"],
         "CENTER_CROP=False (random crops) cannot use the latent cache, which stores one crop per image — "
         "set --CENTER_CROP=True (fast) or --CACHE_LATENTS=False (encodes every step, slower)")
    for name in ("DATA_DIR", "IMAGE_COLUMN", "CAPTION_COLUMN", "REVISION", "RESUME_FROM"):
        need(c[name] is None or isinstance(c[name], str), f"{name} must be text or None, got {c[name]!r}")
    need(bool(c["OUTPUT_DIR"]), "OUTPUT_DIR must not be empty")


def check_paths(cfg):
    """The local folders the run reads: checked before anything slow starts."""
    if cfg.DATA_DIR is not None and not os.path.isdir(cfg.DATA_DIR):
        raise UserError(f"DATA_DIR={cfg.DATA_DIR!r} does not exist or is not a folder — point --DATA_DIR at a folder of images")
    name = cfg.MODEL_ID
    looks_local = os.path.isabs(name) or name.startswith(".") or name.count("/") != 1
    if (os.path.exists(name) or looks_local) and not os.path.isfile(os.path.join(name, "unet", "config.json")):
        raise UserError(f"MODEL_ID={name!r} is not a diffusers-layout model folder (no unet/config.json there) — pass a folder "
                        "with unet/, vae/, text_encoder/, tokenizer/, scheduler/, or a hub id like stable-diffusion-v1-5/stable-diffusion-v1-5")


def check_environment(cfg):
    """Optional packages that a setting needs: missing ones are found now, not mid-run."""
    import importlib.util

    needs = [(cfg.USE_8BIT_ADAM, "bitsandbytes", "USE_8BIT_ADAM=True"), (cfg.REPORT_TO == "tensorboard", "tensorboard", "REPORT_TO='tensorboard'")]
    for wanted, package, setting in needs:
        if wanted and importlib.util.find_spec(package) is None:
            raise UserError(f"{setting} needs the {package} package — pip install {package}, or turn the setting off")


def check_output_dir(path):
    """Fail now, not after hours of training, if the results cannot be written."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"OUTPUT_DIR={path!r} is not writable ({e.strerror}) — pick another --OUTPUT_DIR or fix its permissions") from None


def resolve_mixed_precision(requested, cuda):
    """'auto' -> what this machine does well; refuse what it cannot do at all."""
    if not cuda:
        if requested == "fp16":
            raise UserError("MIXED_PRECISION='fp16' needs a CUDA GPU and none is visible — use --MIXED_PRECISION=no (or bf16) on a CPU")
        return "no" if requested == "auto" else requested
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(f"MIXED_PRECISION='bf16' is not supported by {torch.cuda.get_device_name()} — use --MIXED_PRECISION=fp16")
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def keep_host_memory():
    """CPU training on Linux: by default glibc hands large freed blocks back to the OS and maps them
    again at the next step (page faults every step), and the VAE's big blocks during caching change
    that policy for the rest of the run. Keeping freed host memory for reuse makes every step run at
    the same speed as a bare UNet step; the process keeps its peak memory, which it needs anyway."""
    import ctypes
    import platform

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): leave the allocator alone
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter ids from <malloc.h>
    big = 2**30  # 1 GiB: larger than any single activation block we free and reallocate
    return bool(libc.mallopt(m_mmap_threshold, big)) and bool(libc.mallopt(m_trim_threshold, big))


# =============================================================================
# 2. Load the pretrained model and freeze it
# =============================================================================
def load_models(cfg, weight_dtype, vae_dtype):
    """The five parts of Stable Diffusion (Rombach et al. 2022, LDM Sec. 3): tokenizer + CLIP text
    encoder τθ(y), VAE encoder/decoder E/D (x -> z, 8x smaller), UNet εθ(z_t, t, τθ(y)), noise schedule."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = dict(revision=cfg.REVISION)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(cfg.MODEL_ID, subfolder="tokenizer", **kw)
        # frozen weights are loaded straight into the mixed-precision dtype (half the memory of fp32)
        text_encoder = CLIPTextModel.from_pretrained(cfg.MODEL_ID, subfolder="text_encoder", dtype=weight_dtype, **kw)
        vae = AutoencoderKL.from_pretrained(cfg.MODEL_ID, subfolder="vae", dtype=vae_dtype, **kw)
        unet = UNet2DConditionModel.from_pretrained(cfg.MODEL_ID, subfolder="unet", dtype=weight_dtype, **kw)
        # Training always uses the DDPM forward process, whatever sampler the checkpoint ships for inference.
        noise_scheduler = DDPMScheduler.from_pretrained(cfg.MODEL_ID, subfolder="scheduler", **kw)
    except OSError as e:  # huggingface_hub's not-found / offline / connection errors are OSErrors
        raise UserError(explain_load_error("MODEL_ID", cfg.MODEL_ID, e)) from None
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def explain_load_error(setting, name, error):
    """One line on why a hub download or local load failed, and what to do."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if os.path.isdir(name):
        return f"{setting}={name!r}: could not load from this folder ({text})"
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return (f"{setting}={name!r} is not in the local hub cache and HF_HUB_OFFLINE=1 forbids downloading — "
                f"unset HF_HUB_OFFLINE, or download it once and pass its local folder")
    names = type(error).__name__ + " " + text
    if any(k in names for k in ("RepositoryNotFound", "GatedRepo", "401", "403", "404")):
        return (f"{setting}={name!r} was not found on the hub, or it is private/gated — check the spelling, accept "
                f"its licence on the hub, and log in (huggingface-cli login or HF_TOKEN)")
    return (f"{setting}={name!r} could not be fetched: the hub is unreachable ({text}) — check the network or proxy, "
            f"or download it elsewhere and pass its local folder")


def freeze(*models):
    """W0 stays fixed (Hu et al. 2021, Sec. 4.1): no gradients, no optimizer state, no change."""
    for m in models:
        m.requires_grad_(False)
        m.eval()  # no dropout in the frozen parts


def count_params(model, trainable=None):
    return sum(p.numel() for p in model.parameters() if trainable is None or p.requires_grad == trainable)


# =============================================================================
# 3. Add LoRA adapters (Hu et al. 2021, Sec. 4.1, Eq. 3)
# =============================================================================
def lora_config_from(cfg, target_modules=None):
    from peft import LoraConfig

    # "gaussian": A ~ N(0, σ = 1/r), B = 0, so ΔW = B·A = 0 and the adapted model starts exactly at W0.
    return LoraConfig(r=cfg.LORA_RANK, lora_alpha=cfg.LORA_ALPHA, lora_dropout=cfg.LORA_DROPOUT,
                      init_lora_weights="gaussian", target_modules=list(target_modules or cfg.TARGET_MODULES),
                      use_dora=cfg.USE_DORA, use_rslora=cfg.USE_RSLORA)


def check_target_modules(unet, targets):
    """Each name in TARGET_MODULES must match a Linear layer of the UNet, or PEFT would train nothing there."""
    linear = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        in_attention = sorted({n.split(".attn1.")[-1] for n in linear if ".attn1." in n})
        raise UserError(f"TARGET_MODULES {missing} match no layer of the UNet; its attention projections are "
                        f"{in_attention} — e.g. --TARGET_MODULES=to_q,to_k,to_v,to_out.0")


def add_lora(unet, cfg):
    """Wrap each target Linear W0 (d_out x d_in) with B (d_out x r) · A (r x d_in):
    h = W0·x + (α/r)·B·A·x. Only A and B train; they are kept in fp32 whatever the frozen dtype."""
    check_target_modules(unet, cfg.TARGET_MODULES)
    unet.add_adapter(lora_config_from(cfg))  # PEFT injection, through diffusers' adapter API
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 master weights: bf16 has 8 bits of mantissa, too few for small updates
    return [p for p in unet.parameters() if p.requires_grad]


def add_text_encoder_lora(text_encoder, cfg):
    """TRAIN_TEXT_ENCODER: the same adapters on CLIP's q/k/v/out projections, through PEFT's own API
    (transformers' add_adapter needs a newer PEFT than some installs have)."""
    from peft import inject_adapter_in_model

    config = lora_config_from(cfg, cfg.TEXT_ENCODER_TARGET_MODULES)
    inject_adapter_in_model(config, text_encoder, adapter_name="default")  # also sets text_encoder.peft_config
    for p in text_encoder.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return [p for p in text_encoder.parameters() if p.requires_grad]


# =============================================================================
# 4. Data: captioned images -> pixels and tokens -> (cached) latents and text embeddings
# =============================================================================
def load_captioned_images(cfg, show_progress=True):
    """(images, captions): images is a list of file paths or PIL images, captions a list of str.
    Every image is decoded once here, so a broken file is skipped now, not hours into training."""
    import warnings

    from tqdm.auto import tqdm

    from lora_tools.data import CAPTION_COLUMN_GUESSES, IMAGE_COLUMN_GUESSES, HubImages, open_image, pick_column, read_folder

    if cfg.DATA_DIR is not None:
        records = read_folder(cfg.DATA_DIR, cfg.CAPTION_COLUMN)
        images, captions = [r[0] for r in records], [r[1] for r in records]
    else:
        from datasets import load_dataset

        try:
            ds = load_dataset(cfg.DATASET_NAME, split="train")
        except (OSError, ConnectionError) as e:
            raise UserError(explain_load_error("DATASET_NAME", cfg.DATASET_NAME, e)) from None
        image_col = pick_column(ds.column_names, cfg.IMAGE_COLUMN, IMAGE_COLUMN_GUESSES, "images", "IMAGE_COLUMN")
        caption_col = pick_column(ds.column_names, cfg.CAPTION_COLUMN, CAPTION_COLUMN_GUESSES, "captions", "CAPTION_COLUMN")
        images, captions = HubImages(ds, image_col), [str(c or "") for c in ds[caption_col]]
    n = len(captions) if cfg.MAX_TRAIN_SAMPLES is None else min(cfg.MAX_TRAIN_SAMPLES, len(captions))
    kept, skipped = [], []
    for i in tqdm(range(n), desc="checking images", disable=not show_progress):
        try:
            img = images[i]
            open_image(img) if isinstance(img, str) else img.load()
            kept.append(i)
        except Exception as e:  # truncated, corrupt, or not an image at all: skip it, say which
            name = images[i] if isinstance(images, list) else f"row {i} of {cfg.DATASET_NAME}"
            skipped.append(name)
            warnings.warn(f"skipping unreadable image {name}: {type(e).__name__}: {e}", stacklevel=2)
    where = cfg.DATA_DIR or cfg.DATASET_NAME
    if not kept:
        raise UserError(f"none of the {n} images in {where!r} could be read — check the files (see the warnings above)")
    if skipped:
        print0(f"skipped {len(skipped)} unreadable image(s) of {n}; training on {len(kept)}")
    return [images[i] for i in kept], [captions[i] for i in kept]


def tokenize(tokenizer, captions):
    """Captions -> CLIP token ids, padded/truncated to the tokenizer's 77 positions. (N, 77)"""
    import warnings

    limit = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(captions, truncation=False, verbose=False).input_ids]
    too_long = [c for c, n in zip(captions, lengths) if n > limit]
    if too_long:
        warnings.warn(f"{len(too_long)} caption(s) are longer than the text encoder's {limit} tokens and were cut "
                      f"(e.g. {too_long[0][:60]!r}...)", stacklevel=2)
    return tokenizer(captions, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids


class CaptionedImages(torch.utils.data.Dataset):
    """Item (i, flip): pixels in [-1, 1] (3, R, R), mirrored if flip, and token ids (77,)."""

    def __init__(self, images, input_ids, cfg):
        from torchvision import transforms

        self.images, self.input_ids = images, input_ids
        crop = transforms.CenterCrop(cfg.RESOLUTION) if cfg.CENTER_CROP else transforms.RandomCrop(cfg.RESOLUTION)
        self.transform = transforms.Compose([
            transforms.Resize(cfg.RESOLUTION, interpolation=transforms.InterpolationMode.BILINEAR),  # short side -> R
            crop,
            transforms.ToTensor(),  # (3, R, R) in [0, 1]
            transforms.Normalize([0.5], [0.5]),  # -> [-1, 1], the range the VAE was trained on
        ])

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, item):
        from lora_tools.data import open_image, to_rgb

        i, flip = item if isinstance(item, tuple) else (item, False)
        img = self.images[i]
        pixels = self.transform(open_image(img) if isinstance(img, str) else to_rgb(img))
        return {"pixel_values": pixels.flip(-1) if flip else pixels, "input_ids": self.input_ids[i], "index": i}


class CachedLatents(torch.utils.data.Dataset):
    """Item (i, flip): the VAE posterior (mean, std) of image i (4, R/8, R/8), of its mirror image if
    flip, and its caption's text embedding (77, d). Sampling z0 from the posterior still happens every step."""

    def __init__(self, mean, std, text_emb, input_ids):
        self.mean, self.std, self.text_emb, self.input_ids = mean, std, text_emb, input_ids  # mean, std: (N, 1|2, 4, h, w)

    def __len__(self):
        return len(self.mean)

    def __getitem__(self, item):
        i, flip = item if isinstance(item, tuple) else (item, False)
        k = int(flip)  # orientation 1 is the mirrored image
        text = {"text_emb": self.text_emb[i]} if self.text_emb is not None else {"input_ids": self.input_ids[i]}
        return {"latent_mean": self.mean[i, k], "latent_std": self.std[i, k], "index": i, **text}


@torch.no_grad()
def encode_images(vae, pixels):
    """E(x): pixels (B, 3, R, R) -> posterior mean and std, each (B, 4, R/8, R/8)."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    # contiguous: on a CPU the VAE hands back channels-last tensors, which the UNet would then inherit
    return dist.mean.contiguous(), dist.std.contiguous()


def encode_text(text_encoder, input_ids):
    """τθ(y): token ids (B, 77) -> last hidden states (B, 77, d), what SD's cross-attention reads."""
    return text_encoder(input_ids.to(text_encoder.device), return_dict=False)[0]


@torch.no_grad()
def cache_latents(dataset, vae, text_encoder, cfg, show_progress=True):
    """Run the frozen encoders once over the data (both orientations when RANDOM_FLIP)."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.BATCH_SIZE,
                                         num_workers=min(4, max(0, (os.cpu_count() or 1) - 1)))
    means, stds, embs = [], [], []
    for batch in tqdm(loader, desc="caching latents", disable=not show_progress):
        px = batch["pixel_values"]
        views = [px, px.flip(-1)] if cfg.RANDOM_FLIP else [px]
        moments = [encode_images(vae, v) for v in views]
        means.append(torch.stack([m for m, _ in moments], 1).cpu())  # (B, views, 4, h, w)
        stds.append(torch.stack([s for _, s in moments], 1).cpu())
        if not cfg.TRAIN_TEXT_ENCODER:  # a trained text encoder changes its output every step: no cache
            embs.append(encode_text(text_encoder, batch["input_ids"]).cpu())  # (B, 77, d)
    pin = torch.cuda.is_available()
    mean, std = torch.cat(means), torch.cat(stds)
    emb = torch.cat(embs) if embs else None
    if pin:
        mean, std, emb = mean.pin_memory(), std.pin_memory(), emb.pin_memory() if emb is not None else None
    return CachedLatents(mean, std, emb, dataset.input_ids)


class EpochShuffle(torch.utils.data.Sampler):
    """Yields (index, flip) pairs: a fresh permutation and fresh flips per epoch, both a pure function
    of (seed, epoch), so a resumed run replays exactly the same data without saving sampler state."""

    def __init__(self, n, seed, random_flip):
        self.n, self.seed, self.random_flip, self.epoch = n, seed, random_flip, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        flips = (torch.rand(self.n, generator=g) < 0.5).tolist() if self.random_flip else [False] * self.n
        return iter(zip(order, flips))

    def __len__(self):
        return self.n


# =============================================================================
# 5. The training loop (DDPM, Ho et al. 2020, Algorithm 1 and Eq. 14, in latent space)
# =============================================================================
def min_snr_weights(noise_scheduler, t, gamma):
    """Min-SNR-γ (Hang et al. 2023, Sec. 3.4 and 4.2): weight each timestep's loss by min(SNR(t), γ),
    expressed for the network's target: ÷SNR(t) for ε-prediction, ÷(SNR(t)+1) for v-prediction."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(t.device)[t].float()
    snr = alphas_cumprod / (1 - alphas_cumprod)  # SNR(t) = ᾱ_t / (1 - ᾱ_t)
    clipped = torch.clamp(snr, max=gamma)  # min(SNR(t), γ)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def compute_loss(batch, unet, noise_scheduler, scaling_factor, vae=None, text_encoder=None, snr_gamma=None, noise_offset=0.0):
    """One denoising-loss evaluation: batch -> z0, c -> noise -> z_t -> prediction -> MSE.
    A cached batch carries the encoders' outputs; otherwise the frozen encoders run now
    (what most trainers do at every step, though their output never changes)."""
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"], batch["latent_std"]
    else:
        mean, std = encode_images(vae, batch["pixel_values"])
    text_emb = batch["text_emb"] if "text_emb" in batch else encode_text(text_encoder, batch["input_ids"])
    # z0 ~ E(x), scaled to unit variance (LDM Sec. 3.1); (B, 4, R/8, R/8)
    # (torch.randn, not randn_like: the same seed must give the same noise whatever the tensor's memory layout)
    latents = (mean.float() + std.float() * torch.randn(mean.shape, device=mean.device)) * scaling_factor
    noise = torch.randn(latents.shape, device=latents.device)  # ε ~ N(0, I)
    if noise_offset:  # offset noise (Guttenberg 2023): one extra shift per image and channel, (B, 4, 1, 1)
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    # DDPM Eq. (4): z_t = √ᾱ_t·z0 + √(1-ᾱ_t)·ε
    noisy_latents = noise_scheduler.add_noise(latents, noise, t)
    model_pred = unet(noisy_latents, t, text_emb, return_dict=False)[0]  # εθ(z_t, t, τθ(y)); (B, 4, R/8, R/8)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise  # DDPM Eq. (14): ‖ε − εθ(z_t, t)‖²
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)  # v = √ᾱ_t·ε − √(1-ᾱ_t)·z0
    else:
        raise UserError(f"the scheduler's prediction_type {prediction_type!r} is not supported (epsilon or v_prediction)")
    if snr_gamma is None:
        return mse_loss(model_pred.float(), target.float(), reduction="mean")  # in fp32 whatever the autocast
    per_image = mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    return (per_image * min_snr_weights(noise_scheduler, t, snr_gamma)).mean()


def lora_param_groups(cfg, unet, text_encoder=None):
    """AdamW parameter groups. LoRA+ (Hayou et al. 2024): B matrices learn at LEARNING_RATE x
    LORAPLUS_LR_RATIO; the text encoder has its own rate."""
    groups = []
    te_lr = cfg.TEXT_ENCODER_LEARNING_RATE or cfg.LEARNING_RATE
    for model, lr in ((unet, cfg.LEARNING_RATE), (text_encoder, te_lr)):
        if model is None:
            continue
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups.append({"params": [p for n, p in named if "lora_B" not in n], "lr": lr})  # A (and DoRA's magnitudes)
        groups.append({"params": [p for n, p in named if "lora_B" in n], "lr": lr * (cfg.LORAPLUS_LR_RATIO or 1.0)})
    return [g for g in groups if g["params"]]


def unwrap(accelerator, model):
    """The plain module, without the DDP and torch.compile wrappers (a compiled wrapper would keep
    running its traced graph after adapters are added or switched, and prefixes its parameter names)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def make_optimizer(params, cfg, cuda):  # params: a list of tensors or of parameter groups
    """AdamW over the LoRA tensors: fused into one kernel on a GPU, multi-tensor (foreach) on a CPU,
    or bitsandbytes' 8-bit AdamW (its two moment tensors in 8 bits instead of 32)."""
    if cfg.USE_8BIT_ADAM:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("USE_8BIT_ADAM=True needs bitsandbytes — pip install bitsandbytes, or --USE_8BIT_ADAM=False") from None
        if not cuda:
            raise UserError("USE_8BIT_ADAM=True needs a CUDA GPU — use --USE_8BIT_ADAM=False on a CPU")
        return bnb.optim.AdamW8bit(params, lr=cfg.LEARNING_RATE, weight_decay=cfg.ADAM_WEIGHT_DECAY)
    return torch.optim.AdamW(params, lr=cfg.LEARNING_RATE, weight_decay=cfg.ADAM_WEIGHT_DECAY,
                             fused=True if cuda else None, foreach=None if cuda else True)


# =============================================================================
# 6. Save the adapter, then check that the file is the model we trained
# =============================================================================
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def lora_state_dict(unet, text_encoder=None, dtype=torch.float32):
    """The LoRA tensors under diffusers' key names ('unet.' / 'text_encoder.' prefixes), on the CPU."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    tensors = {}
    for prefix, model in (("unet", unet), ("text_encoder", text_encoder)):
        if model is not None:
            sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
            tensors.update({f"{prefix}.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in sd.items()})
    return tensors


def lora_file_metadata(unet, cfg, text_encoder=None):
    """safetensors metadata: diffusers reads 'lora_adapter_metadata' (rank, alpha, targets, DoRA/rsLoRA)
    to rebuild each adapter at its trained strength; 'training_config' records how it was made."""
    lora_meta = {}
    for prefix, model in (("unet", unet), ("text_encoder", text_encoder)):
        if model is not None:
            config = model.peft_config["default"].to_dict()
            lora_meta.update({f"{prefix}.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in config.items()})
    return {"format": "pt", "lora_adapter_metadata": json.dumps(lora_meta, sort_keys=True, default=str),
            "training_config": cfg.to_json()}


def save_lora(path, unet, cfg, text_encoder=None, dtype=None):
    """Write the diffusers-format LoRA file atomically; refuse NaN/inf weights."""
    from safetensors.torch import save_file

    tensors = lora_state_dict(unet, text_encoder, dtype or SAVE_DTYPES[cfg.SAVE_DTYPE])
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:  # never replace good weights with broken ones
        raise UserError(f"training diverged: {len(bad)} LoRA tensors hold NaN/inf (e.g. {bad[0]}), so {path} was not "
                        "written — lower LEARNING_RATE, use bf16 or MIXED_PRECISION=no, or --VAE_FP32=True; earlier files are kept")
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=lora_file_metadata(unet, cfg, text_encoder))
    return sum(v.numel() for v in tensors.values())


def fixed_unet_input(unet, resolution, device, seed=1234):
    g = torch.Generator().manual_seed(seed)
    h = resolution // 8
    z = torch.randn(1, unet.config.in_channels, h, h, generator=g)
    c = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([500])
    return z.to(device), t.to(device), c.to(device)


@torch.no_grad()
def check_saved_lora(unet, path, cfg, autocast):
    """Reload the file the way diffusers does (load_lora_adapter reads the alpha metadata) into the
    same frozen base, and compare with the trained adapter on one fixed input."""
    z, t, c = fixed_unet_input(unet, cfg.RESOLUTION, unet.device)
    unet.eval()  # no LoRA dropout in the comparison
    with autocast():
        y_trained = unet(z, t, c, return_dict=False)[0].float()
        unet.disable_adapters()
        y_base = unet(z, t, c, return_dict=False)[0].float()
        unet.enable_adapters()
        # folder + weight_name: diffusers reads the alpha metadata only on its safetensors path
        unet.load_lora_adapter(os.path.dirname(path), weight_name=os.path.basename(path), prefix="unet", adapter_name="reloaded")
        unet.set_adapter("reloaded")
        unet.eval()  # the new adapter's dropout modules were created in training mode
        y_reloaded = unet(z, t, c, return_dict=False)[0].float()
    unet.set_adapter("default")
    unet.delete_adapters("reloaded")
    diff = (y_reloaded - y_trained).abs().max().item()
    effect = (y_trained - y_base).abs().max().item()
    base_dtype = next(p.dtype for p in unet.parameters() if not p.requires_grad)
    compute_eps = 1e-5 if base_dtype == torch.float32 else 1e-2  # rounding of the forward pass itself
    save_eps = 1e-2 if cfg.SAVE_DTYPE == "fp16" else 0.0  # fp16 files round B and A (a wrong alpha is off by ~100%)
    tolerance = compute_eps * max(1.0, y_trained.abs().max().item()) + save_eps * effect
    return diff, effect, tolerance


def save_webui_file(cfg, unet, text_encoder, steps, num_images, t_start):
    """OUTPUT_DIR/<OUTPUT_NAME>.safetensors with kohya-style keys (lora_unet_..., lora_te_...,
    .lora_down/.lora_up/.alpha): the format Stable Diffusion WebUI and ComfyUI read."""
    from peft.utils import get_peft_model_state_dict

    from lora_tools.kohya import kohya_metadata, save_kohya_file

    if cfg.USE_DORA:
        print0("note: USE_DORA=True — no WebUI/ComfyUI file written (their DoRA key conventions differ); use the diffusers file")
        return None
    te_sd = get_peft_model_state_dict(text_encoder) if text_encoder is not None else {}
    info = dict(cfg.as_dict(), steps=steps, num_images=num_images, started_at=t_start, finished_at=time.time())
    path = os.path.join(cfg.OUTPUT_DIR, f"{cfg.OUTPUT_NAME}.safetensors")
    # kohya files always mean an α/r scale; with rsLoRA (α/√r) the file carries α' = α·√r
    save_kohya_file(path, get_peft_model_state_dict(unet), te_sd, cfg.LORA_ALPHA, cfg.LORA_ALPHA, kohya_metadata(info),
                    SAVE_DTYPES[cfg.SAVE_DTYPE], use_rslora=cfg.USE_RSLORA)
    return path


def report_rank_spectrum(cfg, unet):
    """Look inside the adapter: singular values of every learned update ΔW = (α/r)·B·A, and how much
    of each update's energy its top 1, 2, ... r directions carry (Hu et al. 2021's low-rank idea, measured)."""
    from lora_tools.pictures import lora_updates, save_spectrum_plot, spectrum_table

    if cfg.USE_DORA:
        print0("note: USE_DORA=True — no rank spectrum (a DoRA update also rescales W0's columns, it is not (α/r)·B·A)")
        return
    rows, text = spectrum_table(lora_updates(unet))
    print0(text)
    save_spectrum_plot(rows, os.path.join(cfg.OUTPUT_DIR, "rank_spectrum.png"))


def plot_loss_curve(metrics_path, png_path):
    from lora_tools.pictures import read_metrics, save_loss_curve

    records = read_metrics(metrics_path)
    if records:
        save_loss_curve(records, png_path)


# =============================================================================
# 7. Load base + LoRA as any user would, and generate
# =============================================================================
def load_pipeline_with_lora(cfg, weights_dir, dtype, weight_name=WEIGHTS_NAME):
    """StableDiffusionPipeline.from_pretrained + load_lora_weights: plain diffusers, nothing of ours."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(cfg.MODEL_ID, revision=cfg.REVISION, dtype=dtype,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(weights_dir, weight_name=weight_name)
    return pipe


def render(pipe, cfg, prompts, seeds):
    """One image per (prompt, seed), each from its own CPU generator: the same noise on any device."""
    pipe.set_progress_bar_config(disable=True)
    return [pipe(p, height=cfg.RESOLUTION, width=cfg.RESOLUTION, num_inference_steps=cfg.NUM_INFERENCE_STEPS,
                 guidance_scale=cfg.GUIDANCE_SCALE, generator=torch.Generator().manual_seed(s)).images[0]
            for p in prompts for s in seeds]


def validation_grid(pipe, cfg):
    """VALIDATION_PROMPTS (rows) x NUM_VALIDATION_SEEDS (columns), as one labelled picture."""
    from lora_tools.pictures import image_grid

    seeds = [cfg.SEED + i for i in range(cfg.NUM_VALIDATION_SEEDS)]
    images = render(pipe, cfg, cfg.VALIDATION_PROMPTS, seeds)
    return image_grid(images, rows=len(cfg.VALIDATION_PROMPTS), labels=[f"seed {s}" for s in seeds],
                      row_labels=list(cfg.VALIDATION_PROMPTS))


def save_png(image, path):
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def save_comparison(pipe, cfg, path):
    """comparison.png: the same prompts and seed without (top) and with (bottom) the LoRA."""
    from lora_tools.pictures import comparison_image

    pipe.disable_lora()
    base = render(pipe, cfg, cfg.VALIDATION_PROMPTS, [cfg.SEED])
    pipe.enable_lora()
    tuned = render(pipe, cfg, cfg.VALIDATION_PROMPTS, [cfg.SEED])
    save_png(comparison_image(base, tuned, list(cfg.VALIDATION_PROMPTS)), path)


@torch.no_grad()
def log_validation(cfg, accelerator, unet, text_encoder, dtype, step):
    """Mid-training pictures: the model being trained, wrapped in a pipeline (VAE and, unless trained,
    text encoder reloaded from MODEL_ID), rendering VALIDATION_PROMPTS into validation/step-<N>.png."""
    from diffusers import StableDiffusionPipeline

    parts = dict(unet=unwrap(accelerator, unet))
    if cfg.TRAIN_TEXT_ENCODER:
        parts["text_encoder"] = unwrap(accelerator, text_encoder)
    pipe = StableDiffusionPipeline.from_pretrained(cfg.MODEL_ID, revision=cfg.REVISION, dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False, **parts).to(accelerator.device)
    for model in parts.values():
        model.eval()
    with accelerator.autocast():
        grid = validation_grid(pipe, cfg)
    path = os.path.join(cfg.OUTPUT_DIR, "validation", f"step-{step:06d}.png")
    save_png(grid, path)
    del pipe
    return path


def merge_and_save(pipe, folder):
    """SAVE_MERGED_MODEL: W = W0 + (α/r)·B·A written into the base weights (Hu et al. 2021, Sec. 4.1:
    no extra inference latency), saved as a full pipeline folder that needs no LoRA loading."""
    import shutil
    import tempfile

    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()  # the fused weights stay; only the adapter modules go
    parent = os.path.dirname(os.path.abspath(folder))
    tmp = tempfile.mkdtemp(dir=parent, prefix=".merged-")
    try:
        pipe.save_pretrained(tmp)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# =============================================================================
# Checkpoints, resume, interruption (helpers of the loop in main)
# =============================================================================
def save_training_checkpoint(cfg, step, unet, text_encoder, optimizer, lr_scheduler, accelerator):
    from lora_tools.checkpoint import save_checkpoint

    raw_unet = unwrap(accelerator, unet)
    raw_te = unwrap(accelerator, text_encoder) if cfg.TRAIN_TEXT_ENCODER else None
    write = lambda p: save_lora(p, raw_unet, cfg, raw_te, dtype=torch.float32)  # fp32: resume must be exact  # noqa: E731
    return save_checkpoint(cfg.OUTPUT_DIR, step, write, optimizer, lr_scheduler, accelerator.scaler,
                           {"global_step": step}, cfg.to_json(), cfg.CHECKPOINTS_TOTAL_LIMIT)


def restore_checkpoint(path, cfg, unet, text_encoder, optimizer, lr_scheduler, accelerator):
    """Load the LoRA weights, optimizer, schedule and scaler state of checkpoint `path`.
    Returns (global_step, rng_states); the RNG states are restored by the loop at the right moment."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    from lora_tools.checkpoint import load_checkpoint

    lora, state, old = load_checkpoint(path)
    now = cfg.as_dict()
    for key in ("LORA_RANK", "TARGET_MODULES", "USE_DORA", "TRAIN_TEXT_ENCODER", "TEXT_ENCODER_TARGET_MODULES"):
        before = old.get(key, globals()[key])  # a key the checkpoint lacks had its default then
        if before != now[key]:
            raise UserError(f"{path} was trained with {key}={before!r}, this run has {now[key]!r} — "
                            f"use the same --{key} to resume")
    changed = [k for k in ("BATCH_SIZE", "GRADIENT_ACCUMULATION_STEPS", "SEED", "LORA_ALPHA", "LEARNING_RATE") if old.get(k) != now[k]]
    if changed:
        print0(f"note: {', '.join(changed)} differ from the checkpoint's run: the continuation will not be exact")
    parts = [("unet.", unet, convert_unet_state_dict_to_peft)]
    if cfg.TRAIN_TEXT_ENCODER:
        parts.append(("text_encoder.", text_encoder, convert_state_dict_to_peft))
    for prefix, model, to_peft in parts:
        sd = to_peft({k[len(prefix):]: v for k, v in lora.items() if k.startswith(prefix)})
        result = set_peft_model_state_dict(unwrap(accelerator, model), sd, adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"{path} does not match this model: unexpected keys such as {result.unexpected_keys[0]}")
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    return state["position"]["global_step"], state["rng"]


def start_metrics(path, resume_step):
    """metrics.jsonl: one line per optimizer step. A fresh run starts it anew; a resumed run keeps
    the lines up to its checkpoint's step."""
    from lora_tools.pictures import read_metrics  # ignores a last line cut short by a crash

    kept = [r for r in read_metrics(path) if r["step"] <= resume_step] if resume_step and os.path.isfile(path) else []
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def append_metrics(path, records):
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


class StopRequest:
    """Ctrl-C / SIGTERM set a flag; the loop checkpoints at the next step boundary and exits.
    A second Ctrl-C stops at once."""

    def __init__(self):
        import signal

        self.signum = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print0("\nstop requested: saving a checkpoint after this step (Ctrl-C again to quit at once)")

    def restore(self):
        import signal

        for s, handler in self.previous.items():
            signal.signal(s, handler)


def resume_command(argv, checkpoint):
    import shlex

    kept = [a for a in argv if not a.startswith("--RESUME_FROM=")]
    return shlex.join(["python", os.path.basename(__file__), *kept, f"--RESUME_FROM={checkpoint}"])


# =============================================================================
# The run: sections 1-7 in order
# =============================================================================
def main(argv):
    # --- 1. configuration -------------------------------------------------------
    cfg = resolve_config(argv)
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed

    from lora_tools.checkpoint import resolve_resume, set_rng_states

    check_environment(cfg)
    cuda = torch.cuda.is_available()
    if not cuda:
        keep_host_memory()
    mixed_precision = resolve_mixed_precision(cfg.MIXED_PRECISION, cuda)
    weight_dtype = DTYPES[mixed_precision]  # dtype of every frozen weight
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not cuda,
                              gradient_accumulation_steps=cfg.GRADIENT_ACCUMULATION_STEPS,
                              dataloader_config=DataLoaderConfiguration(non_blocking=cuda),  # async copies from pinned memory
                              log_with=cfg.REPORT_TO, project_dir=os.path.join(cfg.OUTPUT_DIR, "logs"))
    device = accelerator.device
    if not cuda:
        print0("no CUDA GPU visible: training on the CPU in fp32 — fine for --DEMO=True, far too slow for SD1.5")
    if cfg.DEMO:
        from lora_tools.demo import build_tiny_dataset, build_tiny_pipeline

        with accelerator.main_process_first():  # built once, then every process reads it
            build_tiny_pipeline(demo_settings["MODEL_ID"])
            build_tiny_dataset(demo_settings["DATA_DIR"])
        print0("DEMO: a tiny Stable-Diffusion-shaped model with random weights; its test image will be noise")
    check_paths(cfg)
    if accelerator.is_main_process:
        check_output_dir(cfg.OUTPUT_DIR)
    resume_path = resolve_resume(cfg.RESUME_FROM, cfg.OUTPUT_DIR)
    if cfg.RESUME_FROM == "latest" and resume_path is None:
        print0(f"RESUME_FROM=latest: no checkpoint in {cfg.OUTPUT_DIR} yet, starting a new run")
    if cuda and cfg.ALLOW_TF32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg.SEED)

    # --- 4a. list the data first: a bad folder fails before any model download ---
    images, captions = load_captioned_images(cfg, show_progress=accelerator.is_local_main_process)

    # --- 2. load and freeze -----------------------------------------------------
    vae_dtype = torch.float32 if cfg.VAE_FP32 else weight_dtype
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_models(cfg, weight_dtype, vae_dtype)
    freeze(text_encoder, vae, unet)
    base_params = count_params(unet)
    for model in (text_encoder, vae, unet):
        model.to(device)

    # --- 3. add LoRA ------------------------------------------------------------
    lora_params = add_lora(unet, cfg)
    if cfg.TRAIN_TEXT_ENCODER:
        lora_params += add_text_encoder_lora(text_encoder, cfg)
    trainable = sum(p.numel() for p in lora_params)
    scale = cfg.LORA_ALPHA / (math.sqrt(cfg.LORA_RANK) if cfg.USE_RSLORA else cfg.LORA_RANK)
    print0(f"LoRA r={cfg.LORA_RANK}, α={cfg.LORA_ALPHA} (scale {'α/√r' if cfg.USE_RSLORA else 'α/r'} = {scale:g}"
           f"{', DoRA' if cfg.USE_DORA else ''}) on {list(cfg.TARGET_MODULES)}{' + text encoder' if cfg.TRAIN_TEXT_ENCODER else ''}")
    print0(f"trainable LoRA parameters: {trainable:,} = {100 * trainable / base_params:.3f}% of the UNet's {base_params:,} (frozen, {weight_dtype}); LoRA in fp32")
    if cfg.GRADIENT_CHECKPOINTING:
        unet.enable_gradient_checkpointing()

    # --- 4b. pixels and tokens -> (cached) latents and embeddings ----------------
    dataset = CaptionedImages(images, tokenize(tokenizer, captions), cfg)
    scaling_factor = vae.config.scaling_factor  # SD1.x: 0.18215, puts z0 at roughly unit variance
    if cfg.CACHE_LATENTS:
        dataset = cache_latents(dataset, vae, text_encoder, cfg, show_progress=accelerator.is_local_main_process)
        vae = None  # done with the frozen encoders: free their memory for the UNet
        if not cfg.TRAIN_TEXT_ENCODER:
            text_encoder = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    workers = cfg.DATALOADER_NUM_WORKERS
    if workers is None:
        workers = 0 if cfg.CACHE_LATENTS else min(4, max(0, (os.cpu_count() or 1) - 1))
    sampler = EpochShuffle(len(dataset), cfg.SEED, cfg.RANDOM_FLIP)
    train_dataloader = torch.utils.data.DataLoader(dataset, batch_size=cfg.BATCH_SIZE, sampler=sampler,
                                                   num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0)

    # --- 5. optimizer, schedule, training loop ----------------------------------
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    optimizer = make_optimizer(lora_param_groups(cfg, unet, text_encoder if cfg.TRAIN_TEXT_ENCODER else None), cfg, cuda)
    if cfg.COMPILE:
        unet = torch.compile(unet)
    trained = [unet, text_encoder] if cfg.TRAIN_TEXT_ENCODER else [unet]
    *trained, optimizer, train_dataloader = accelerator.prepare(*trained, optimizer, train_dataloader)
    unet, text_encoder = trained[0], trained[1] if cfg.TRAIN_TEXT_ENCODER else text_encoder
    steps_per_epoch = math.ceil(len(train_dataloader) / cfg.GRADIENT_ACCUMULATION_STEPS)
    max_train_steps = cfg.MAX_TRAIN_STEPS or cfg.NUM_EPOCHS * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(cfg.LR_SCHEDULER, optimizer=optimizer, num_warmup_steps=cfg.LR_WARMUP_STEPS,
                                 num_training_steps=max_train_steps)  # stepped once per optimizer step, below
    effective_batch = cfg.BATCH_SIZE * cfg.GRADIENT_ACCUMULATION_STEPS * accelerator.num_processes
    print0(f"{len(dataset)} images at {cfg.RESOLUTION}px (latents 4x{cfg.RESOLUTION // 8}x{cfg.RESOLUTION // 8}) | "
           f"effective batch {effective_batch} = {cfg.BATCH_SIZE} x {cfg.GRADIENT_ACCUMULATION_STEPS} accumulation x {accelerator.num_processes} process(es) | "
           f"{steps_per_epoch} steps/epoch, {max_train_steps} steps, {num_epochs} epochs | mixed precision: {mixed_precision} | "
           f"{'cached latents' if cfg.CACHE_LATENTS else 'encoding every step'}")

    global_step, resume_rng = 0, None
    if resume_path is not None:
        global_step, resume_rng = restore_checkpoint(resume_path, cfg, unet, text_encoder, optimizer, lr_scheduler, accelerator)
        print0(f"resumed from {resume_path} at step {global_step}")
    first_epoch, skip_batches = divmod(global_step, steps_per_epoch)
    skip_batches *= cfg.GRADIENT_ACCUMULATION_STEPS  # micro-batches of the resumed epoch already trained on
    metrics_path = os.path.join(cfg.OUTPUT_DIR, "metrics.jsonl")
    if accelerator.is_main_process:
        start_metrics(metrics_path, global_step)
    if cfg.REPORT_TO:
        accelerator.init_trackers("lora", config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.as_dict().items()})

    micro_losses, step_losses, step_lr_epoch, first_images, num_batches = [], [], [], [], 0
    progress = tqdm(total=max_train_steps, initial=global_step, desc="training", disable=not accelerator.is_local_main_process)
    stop = StopRequest()
    for model in trained:
        model.train()
    t_start = time.time()
    try:
        for epoch in range(first_epoch, num_epochs):
            if global_step >= max_train_steps:
                break
            sampler.set_epoch(epoch)
            train_dataloader.set_epoch(epoch)  # accelerate's wrapper would otherwise count epochs from 0 after a resume
            batches = iter(train_dataloader)
            if resume_rng is not None:  # exact resume: skip what was trained on, then restore the RNGs
                for _ in range(skip_batches):
                    next(batches)
                set_rng_states(resume_rng)
                resume_rng = None
            for batch in batches:
                with accelerator.accumulate(*trained):
                    # get batch -> noise -> predict -> loss (the math is in compute_loss, section 5)
                    loss = compute_loss(batch, unet, noise_scheduler, scaling_factor, vae, text_encoder,
                                        snr_gamma=cfg.SNR_GAMMA, noise_offset=cfg.NOISE_OFFSET)
                    # backward (mixed precision: accelerate scales fp16 losses)
                    accelerator.backward(loss)
                    # clip: the list of LoRA tensors, not a generator that the first use exhausts
                    if accelerator.sync_gradients and cfg.MAX_GRAD_NORM is not None:
                        accelerator.clip_grad_norm_(lora_params, cfg.MAX_GRAD_NORM)
                    # step (accelerate skips it until the last accumulation micro-batch)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                micro_losses.append(loss.detach())
                num_batches += 1
                if len(first_images) < 2:  # which images this process drew first (reported with several processes)
                    first_images.append(batch["index"])
                if not accelerator.sync_gradients:
                    continue
                step_losses.append(torch.stack(micro_losses).mean())
                step_lr_epoch.append((lr_scheduler.get_last_lr()[0], epoch))
                micro_losses = []
                lr_scheduler.step()
                global_step += 1
                progress.update(1)
                # log: one device->host read every LOG_EVERY steps, not one per step
                if global_step % cfg.LOG_EVERY == 0 or global_step == max_train_steps:
                    values = accelerator.reduce(torch.stack(step_losses), "mean").tolist()
                    first = global_step - len(values) + 1
                    records = [{"step": first + i, "loss": v, "lr": lr, "epoch": ep} for i, (v, (lr, ep)) in enumerate(zip(values, step_lr_epoch))]
                    step_losses, step_lr_epoch = [], []
                    if accelerator.is_main_process:
                        append_metrics(metrics_path, records)
                    if cfg.REPORT_TO:
                        for r in records:
                            accelerator.log({"loss": r["loss"], "lr": r["lr"]}, step=r["step"])
                    progress.set_postfix(loss=f"{sum(values) / len(values):.4f}", lr=f"{records[-1]['lr']:.2e}")
                    if not all(math.isfinite(v) for v in values):
                        raise UserError(f"training diverged: the loss became {values[-1]} by step {global_step} — lower "
                                        "LEARNING_RATE, use bf16 rather than fp16 (or --VAE_FP32=True), or MIXED_PRECISION=no; "
                                        "no weights were written, earlier checkpoints are kept")
                # validation pictures every VALIDATION_STEPS
                if cfg.VALIDATION_STEPS and global_step % cfg.VALIDATION_STEPS == 0 and global_step < max_train_steps:
                    if accelerator.is_main_process:
                        path = log_validation(cfg, accelerator, unet, text_encoder, weight_dtype, global_step)
                        progress.write(f"validation images: {path}")
                    for model in trained:
                        model.train()
                # checkpoint: every CHECKPOINTING_STEPS, and when Ctrl-C / SIGTERM asked us to stop
                stopping = stop.signum is not None
                if accelerator.num_processes > 1:  # every process must agree, or one waits forever
                    stopping = bool(accelerator.reduce(torch.tensor(float(stopping), device=device), "max").item())
                periodic = cfg.CHECKPOINTING_STEPS and global_step % cfg.CHECKPOINTING_STEPS == 0
                if (periodic or stopping) and global_step < max_train_steps:
                    accelerator.wait_for_everyone()
                    if accelerator.is_main_process:
                        path = save_training_checkpoint(cfg, global_step, unet, text_encoder, optimizer, lr_scheduler, accelerator)
                        progress.write(f"checkpoint: {path}")
                    if stopping:
                        progress.close()
                        path = os.path.join(cfg.OUTPUT_DIR, f"checkpoint-{global_step}")
                        print0(f"stopped at step {global_step}; resume with:\n  {resume_command(argv, path)}")
                        sys.exit(130 if stop.signum == 2 else 143)
                if global_step >= max_train_steps:
                    break
    finally:
        stop.restore()
        progress.close()  # before any error message, so it starts on a line of its own
    print0(f"trained {global_step} steps in {time.time() - t_start:.1f}s")
    if accelerator.num_processes > 1:  # data parallel: each process trained on its own share of every batch
        shown = torch.cat(first_images).tolist()[:8] if first_images else []
        print(f"process {accelerator.process_index}/{accelerator.num_processes}: {num_batches} batches, first images {shown}", flush=True)

    # --- 6. save and check ------------------------------------------------------
    accelerator.wait_for_everyone()
    unet = unwrap(accelerator, unet)
    text_encoder = unwrap(accelerator, text_encoder) if cfg.TRAIN_TEXT_ENCODER else None
    weights_path = os.path.join(cfg.OUTPUT_DIR, WEIGHTS_NAME)
    if accelerator.is_main_process:
        n = save_lora(weights_path, unet, cfg, text_encoder)
        kohya_path = save_webui_file(cfg, unet, text_encoder, global_step, len(dataset), t_start)
        atomic_write_text(os.path.join(cfg.OUTPUT_DIR, "training_config.json"), cfg.to_json() + "\n")
        print0(f"saved {n:,} LoRA parameters to {weights_path} ({os.path.getsize(weights_path) / 1e6:.2f} MB, {cfg.SAVE_DTYPE})"
               + (f" and {kohya_path} (WebUI/ComfyUI keys)" if kohya_path else ""))
        diff, effect, tolerance = check_saved_lora(unet, weights_path, cfg, accelerator.autocast)
        print0(f"reload check: saved file vs trained model, max |Δoutput| = {diff:.2e} (LoRA's own effect {effect:.2e})")
        if diff > tolerance:
            raise RuntimeError(f"the saved LoRA does not reproduce the trained model (max difference {diff:.3g} > {tolerance:.3g})")
        report_rank_spectrum(cfg, unet)
        plot_loss_curve(metrics_path, os.path.join(cfg.OUTPUT_DIR, "loss_curve.png"))

    # --- 7. load base + LoRA as a user would, and generate ------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        del unet, vae, text_encoder, optimizer, train_dataloader, dataset, trained
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        pipe = load_pipeline_with_lora(cfg, cfg.OUTPUT_DIR, weight_dtype).to(device)
        image_path = os.path.join(cfg.OUTPUT_DIR, "test_generation.png")
        save_png(render(pipe, cfg, [cfg.VALIDATION_PROMPT], [cfg.SEED])[0], image_path)
        print0(f"test image: {image_path} — reproduce it with plain diffusers:\n"
               f"  pipe = StableDiffusionPipeline.from_pretrained({cfg.MODEL_ID!r}, safety_checker=None)\n"
               f"  pipe.load_lora_weights({cfg.OUTPUT_DIR!r})\n"
               f"  pipe({cfg.VALIDATION_PROMPT!r}, height={cfg.RESOLUTION}, width={cfg.RESOLUTION}, "
               f"num_inference_steps={cfg.NUM_INFERENCE_STEPS}, guidance_scale={cfg.GUIDANCE_SCALE}, "
               f"generator=torch.Generator().manual_seed({cfg.SEED})).images[0]")
        save_comparison(pipe, cfg, os.path.join(cfg.OUTPUT_DIR, "comparison.png"))
        if cfg.SAVE_MERGED_MODEL:
            merged = os.path.join(cfg.OUTPUT_DIR, "merged_pipeline")
            merge_and_save(pipe, merged)
            print0(f"merged pipeline (LoRA fused into the weights): {merged}")
    accelerator.end_training()


OOM_HELP = ("out of GPU memory — lower BATCH_SIZE (and raise GRADIENT_ACCUMULATION_STEPS to keep the effective batch), "
            "set --GRADIENT_CHECKPOINTING=True, lower RESOLUTION, try --USE_8BIT_ADAM=True, or use "
            "--MIXED_PRECISION=bf16/fp16; checkpoints already written are kept")

if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        print("settings (defaults):")
        for k in CONFIG_KEYS:
            print(f"  --{k}={globals()[k]!r}")
        sys.exit(0)
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError:
        print(f"error: {OOM_HELP}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("\ninterrupted before a checkpoint could be saved", file=sys.stderr)
        sys.exit(130)
