"""
LoRA fine-tuning of Stable Diffusion, end to end, in one readable file.

It loads Stable Diffusion, freezes all of it, adds small trainable low-rank matrices (LoRA) to the
UNet's attention projections, trains them with the denoising objective, saves them as one small
safetensors file that diffusers loads, and renders a test image from base model + LoRA.

Usage (every constant below can be overridden as --NAME=value, spelled exactly like the constant):

    # offline demo on a CPU, under a minute: LoRA teaches a small pretrained model a colour it never saw
    python lora_complete_example.py --DEMO=True

    # the real run: downloads SD1.5 and the Naruto captions dataset, trains on the visible GPU
    python lora_complete_example.py

    # pick the GPU, your own images (a folder with metadata.jsonl or .txt captions), other knobs
    CUDA_VISIBLE_DEVICES=1 python lora_complete_example.py --DATA_DIR=./my_images --LORA_RANK=8

    # several GPUs, data-parallel
    accelerate launch --multi_gpu --num_processes 2 lora_complete_example.py

    # one subject from a few pictures (DreamBooth, pivotal tuning): the sibling script
    python lora_dreambooth_example.py --help

Lists take comma-separated text (--TARGET_MODULES=to_q,to_v) or a Python list; for prompts a plain text
is one prompt, commas and all (--VALIDATION_PROMPTS="a dog, in a bucket"), and several are a list
(--VALIDATION_PROMPTS="['a dog, in a bucket', 'a cat']").

Writes to OUTPUT_DIR: pytorch_lora_weights.safetensors (the adapter in diffusers' format, with its
rank/alpha metadata), <OUTPUT_NAME>.safetensors (the same adapter for Stable Diffusion WebUI and
ComfyUI), training_config.json, test_generation.png, comparison.png (without/with the LoRA),
metrics.jsonl + loss_curve.png, rank_spectrum.png, and checkpoint-<step>/ folders to resume from.
The numbered sections follow diffusion_lora_finetuning_tutorial.md chapter 4.
"""
import contextlib
import itertools
import json
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import gather_object, set_seed
import diffusers
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, ModelMixin, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, compute_snr
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, PeftType, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch.nn.functional import mse_loss
from torchvision import transforms
from torchvision.transforms import functional as tvf
from tqdm.auto import tqdm

from lora_tools import checkpoint as ckpt
from lora_tools.buckets import BucketBatches, describe_buckets, pick_bucket
from lora_tools.checks import (check_config, check_demo_base, check_environment, check_output_dir,
                               check_paths, explain_load_error)
from lora_tools.config import Config, UserError, parse_overrides
from lora_tools.data import (CAPTION_COLUMN_GUESSES, IMAGE_COLUMN_GUESSES, HubImages, open_image, pick_column,
                             picture_size, read_folder, to_rgb)
from lora_tools.family import Family, detect, encode_prompt, native_resolution, unet_conditioning
from lora_tools.files import atomic_path, atomic_write_text
from lora_tools.kohya import kohya_metadata, save_kohya_file
from lora_tools.machine import free_memory, host_memory_peak, keep_host_memory
from lora_tools.pictures import (comparison_image, image_grid, read_metrics, save_loss_curve,
                                 save_spectrum_plot)
from lora_tools.spectrum import lora_updates, spectrum_table

# =============================================================================
# 1. Configuration
# =============================================================================
# model
MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id, or a local folder in diffusers layout
REVISION = None  # hub branch/tag/commit of MODEL_ID; None = main
# data
DATASET_NAME = "lambdalabs/naruto-blip-captions"  # hub dataset with an image and a caption column
DATA_DIR = None  # local folder (metadata.jsonl/.csv, or images + same-name .txt); wins over DATASET_NAME
IMAGE_COLUMN = None  # column holding the images; None = guess ("image", ...)
CAPTION_COLUMN = None  # column holding the captions; None = guess ("text", "caption", ...)
MAX_TRAIN_SAMPLES = None  # use only the first N images (quick experiments); None = all
RESOLUTION = None  # training size in pixels, a multiple of 8; None = the model's own (SD1.5 512, SDXL 1024)
ASPECT_RATIO_BUCKETING = False  # True = each picture near its own shape (~RESOLUTION² pixels), not a square
BUCKET_STEP = 64  # with buckets: their sides are multiples of this (64 suits every SD and SDXL UNet)
BUCKET_UPSCALE = False  # with buckets: True = pictures under RESOLUTION² px are scaled up to a full bucket
CENTER_CROP = True  # True = center crop after resizing; False = random crop (needs CACHE_LATENTS=False)
RANDOM_FLIP = True  # random horizontal flips (a cheap 2x augmentation)
CACHE_LATENTS = True  # encode every image and caption once, before training (the encoders are frozen)
VALIDATION_SPLIT = None  # held out for a validation loss: a fraction (0.1) or a number (20) of images
SHUFFLE_CAPTION_TAGS = False  # "tag1, tag2, ..." captions in a new order each time (encoded every step)
KEEP_TAGS = 0  # with SHUFFLE_CAPTION_TAGS: the first N tags stay in place (kohya's keep_tokens)
CAPTION_DROPOUT = 0.0  # chance an example trains with the empty caption (SD 1.5 itself was trained with 0.1)
DATALOADER_NUM_WORKERS = None  # image-decoding processes; None = 0 with the cache, else min(4, cores - 1)
# lora
LORA_RANK = 4  # r: rank of B·A; 4-16 is typical, higher = more capacity and a bigger file
LORA_ALPHA = 4  # α: the update is scaled by α/r; α = r is a neutral start
LORA_DROPOUT = 0.0  # dropout on the LoRA branch's input; 0.05-0.1 against overfitting on few images
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]  # UNet attention projections that get adapters
USE_DORA = False  # DoRA (Liu et al. 2024): also learn each output feature's magnitude; a little slower
USE_RSLORA = False  # rsLoRA (Kalajdzievski 2023): scale by α/√r, not α/r, so high ranks keep learning
TRAIN_TEXT_ENCODER = False  # also put LoRA on the CLIP text encoder (prompts can't then be cached)
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP attention projections
# optimisation
LEARNING_RATE = 1e-4  # AdamW step size for the LoRA weights (HF LoRA blog: 1e-4; full fine-tuning ~1e-6)
TEXT_ENCODER_LEARNING_RATE = None  # for the text encoder's LoRA; None = LEARNING_RATE
LORAPLUS_LR_RATIO = None  # LoRA+ (Hayou et al. 2024): B learns at LEARNING_RATE x this (> 1); None = off
SNR_GAMMA = None  # Min-SNR-γ loss weighting (Hang et al. 2023); 5.0 is the paper's default; None = plain MSE
NOISE_OFFSET = 0.0  # offset noise (Guttenberg 2023): this x N(0,1) per image and channel; 0.05-0.1 is common
BATCH_SIZE = 1  # images per GPU per forward pass
GRADIENT_ACCUMULATION_STEPS = 4  # micro-batches per optimizer step; effective batch: BATCH_SIZE x this x GPUs
NUM_EPOCHS = 10  # passes over the data (ignored when MAX_TRAIN_STEPS is set)
MAX_TRAIN_STEPS = None  # optimizer steps in total; None = NUM_EPOCHS worth; when set it wins
LR_SCHEDULER = "constant"  # constant | constant_with_warmup | linear | cosine | cosine_with_restarts | ...
LR_WARMUP_STEPS = 0  # optimizer steps of linear warm-up from 0 to LEARNING_RATE
MAX_GRAD_NORM = 1.0  # clip the LoRA gradients' global L2 norm to this; None = no clipping
ADAM_WEIGHT_DECAY = 1e-2  # AdamW decoupled weight decay
MIXED_PRECISION = "auto"  # auto | no | fp16 | bf16; auto = bf16 where the GPU has it, else fp16; CPU: fp32
ALLOW_TF32 = True  # TF32 tensor cores for fp32 matmuls on Ampere+ GPUs (faster; a 10-bit mantissa, not 23)
VAE_FP32 = False  # the VAE in fp32 under bf16 too (under fp16 it is, where its config says force_upcast)
GRADIENT_CHECKPOINTING = False  # recompute UNet activations in backward: less memory, more compute
USE_8BIT_ADAM = False  # bitsandbytes 8-bit AdamW: saves 3/4 of a LoRA's few-MB optimizer state (GPU only)
COMPILE = False  # torch.compile the UNet (slow first step, faster after)
SEED = 42  # seeds data order, noise, timesteps, LoRA init and the test image
LOG_EVERY = 10  # log the mean loss every N optimizer steps (reading it from the GPU is a sync)
# checkpoints
CHECKPOINTING_STEPS = 500  # a resumable OUTPUT_DIR/checkpoint-<step>/ every N optimizer steps; None = never
CHECKPOINTS_TOTAL_LIMIT = None  # keep only the newest N checkpoints; None = keep all
RESUME_FROM = None  # "latest" (newest checkpoint in OUTPUT_DIR) or a checkpoint-<step> folder; None = new
OVERWRITE_OUTPUT_DIR = False  # True = a new run may replace another run's results (a demo's: always)
# output
OUTPUT_DIR = "my_lora_model"  # where the adapter, config and pictures go
OUTPUT_NAME = "my_lora"  # the WebUI/ComfyUI copy is OUTPUT_DIR/<OUTPUT_NAME>.safetensors
SAVE_DTYPE = "fp32"  # fp32 | fp16: precision of the saved LoRA files (fp16: half the size) and a merged model
SAVE_MERGED_MODEL = False  # also save base + LoRA fused (W0 + (α/r)·B·A) in OUTPUT_DIR/merged_pipeline
VALIDATION_PROMPTS = ["a man with blue eyes, in the style of naruto",  # the first is test_generation.png;
                      "a girl with pink hair, in the style of naruto"]  # all go in comparison.png
NUM_VALIDATION_SEEDS = 2  # images per prompt in the validation grids (seeds SEED, SEED+1, ...)
VALIDATION_STEPS = None  # render a grid into OUTPUT_DIR/validation/ every N steps; None = only at the end
VALIDATION_LOSS_STEPS = 100  # with VALIDATION_SPLIT: the held-out loss every N steps (and at 0 and the end)
REPORT_TO = None  # "tensorboard": the metrics also through accelerate's trackers (pip install tensorboard)
NUM_INFERENCE_STEPS = 30  # denoising steps for the test image
GUIDANCE_SCALE = 7.5  # classifier-free guidance for the test image
DEMO = False  # True = offline CPU demo: teach the small pretrained demo_base/ model a new colour (see below)

CONFIG_KEYS = [k for k in list(globals()) if k.isupper()]  # everything above, in order

# DEMO=True swaps in these values (any you also give on the command line win). The training code
# below has no demo branches: the demo is a real run on a small pretrained text-to-image model of a
# world of coloured shapes (demo_base/, made by `python -m lora_tools.demo_base`) that has never seen
# the colour purple. The LoRA learns purple from 24 captioned pictures of purple circles and squares,
# and is judged on prompts it never saw (purple triangles, purple on yellow): lora_tools/shapes.py.
# It adapts only the cross-attention layers (attn2), where the prompt's words enter the UNet: a new
# colour is a new meaning of a word, and the pictures' other skills (self-attention) stay untouched.
HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_SETTINGS = dict(
    MODEL_ID=os.path.join(HERE, "demo_base"),
    DATA_DIR=os.path.join(HERE, ".demo_cache", "purple-shapes"),
    RESOLUTION=64,
    BATCH_SIZE=8,
    GRADIENT_ACCUMULATION_STEPS=1,
    MAX_TRAIN_STEPS=100,
    TARGET_MODULES=["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
    LEARNING_RATE=3e-3,
    LOG_EVERY=10,
    NUM_INFERENCE_STEPS=20,
    GUIDANCE_SCALE=4.0,
    VALIDATION_PROMPTS=["a purple triangle on a green background", "a purple circle on a yellow background",
                        "a purple triangle on a white background", "a green triangle on a red background"],
)
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # the file name diffusers' load_lora_weights looks for
# the settings that shape the trained tensors: a checkpoint continues only a run with the same ones
SHAPE_SETTINGS = ("LORA_RANK", "TARGET_MODULES", "USE_DORA", "TRAIN_TEXT_ENCODER",
                  "TEXT_ENCODER_TARGET_MODULES")


def print0(*args, **kwargs):
    """print on the main process only (accelerate sets RANK in each process it launches)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def resolve_config(argv, defaults=None, demo_settings=DEMO_SETTINGS):
    """The block above (or a sibling script's `defaults`) + its DEMO values + --NAME=value overrides
    -> a frozen, checked Config."""
    values = parse_overrides(argv, defaults or {k: globals()[k] for k in CONFIG_KEYS}, log=print0)
    if values["DEMO"]:
        given = {a[2:].split("=", 1)[0] for a in argv}
        values.update({k: v for k, v in demo_settings.items() if k not in given})
    check_config(values)
    return Config(values)


def resolve_mixed_precision(requested, cuda):
    """'auto' -> what this machine does well; refuse what it cannot do at all."""
    if not cuda:
        if requested == "fp16":
            raise UserError("MIXED_PRECISION='fp16' needs a CUDA GPU and none is visible — "
                            "use --MIXED_PRECISION=no (or bf16) on a CPU")
        return "no" if requested == "auto" else requested
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(f"MIXED_PRECISION='bf16' is not supported by {torch.cuda.get_device_name()} — "
                        "use --MIXED_PRECISION=fp16")
    if requested == "auto":  # bf16 tensor cores came with Ampere; T4 and V100 only emulate bf16, slowly
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return requested


DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def start(cfg):
    """Everything the run needs before its first slow step: the Accelerator (one per process under
    `accelerate launch`), the dtype of the frozen weights, the model's family and size, the demo's
    data, and every check. Returns (cfg with RESOLUTION known, accelerator, weight dtype, family)."""
    check_environment(cfg)
    PHASE_PEAKS.clear()
    for library in (diffusers, transformers):  # our progress bars are the ones worth watching
        library.utils.logging.disable_progress_bar()
    cuda = torch.cuda.is_available()
    mixed_precision = resolve_mixed_precision(cfg.MIXED_PRECISION, cuda)
    # gradient accumulation is done by the training loop itself (section 6), so accelerate is told 1
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not cuda,
                              dataloader_config=DataLoaderConfiguration(non_blocking=cuda),  # async copies
                              log_with=cfg.REPORT_TO, project_dir=os.path.join(cfg.OUTPUT_DIR, "logs"))
    if cuda and cfg.ALLOW_TF32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not cuda:
        print0("no CUDA GPU visible: training on the CPU in fp32 — fine for the demo, too slow for SD1.5")
    if cfg.DEMO:
        check_demo_base(DEMO_SETTINGS["MODEL_ID"])
    if cfg.DATA_DIR == DEMO_SETTINGS["DATA_DIR"]:
        from lora_tools.shapes import build_concept_dataset  # the demo's pictures (PIL drawing)

        build_concept_dataset(cfg.DATA_DIR)  # drawn once; safe when processes race (atomic rename)
        print0("DEMO: teaching the pretrained shapes model (demo_base/) purple, a colour it never saw")
    check_paths(cfg)
    try:
        family = detect(cfg.MODEL_ID, cfg.REVISION)  # from its model_index.json
        native = native_resolution(cfg.MODEL_ID, cfg.REVISION)  # from its UNet's and VAE's config.json
    except OSError as e:  # huggingface_hub's not-found / offline / connection errors are OSErrors
        raise UserError(explain_load_error("MODEL_ID", cfg.MODEL_ID, e)) from None
    if cfg.RESOLUTION is None:  # the config records the size the run trained at
        cfg = cfg.replace(RESOLUTION=native)
    elif cfg.RESOLUTION < 0.75 * native:
        print0(f"note: RESOLUTION={cfg.RESOLUTION} is well below the {native} px this model was trained at: "
               "its pictures at this size are worse, and so is what the LoRA learns from them")
    if accelerator.is_main_process:
        check_output_dir(cfg.OUTPUT_DIR)
    print0(f"model: {family.name} ({family.pipeline}), {cfg.RESOLUTION} px | mixed precision: "
           f"{mixed_precision} (frozen weights in {DTYPES[mixed_precision]}, LoRA weights in fp32)")
    return cfg, accelerator, DTYPES[mixed_precision], family


PHASE_PEAKS = {}  # this run's peak memory per phase, in bytes: peak_memory_text fills it, start() empties it


def peak_memory_text(accelerator, phase):
    """Peak memory while `phase` ran (since the previous call): on a GPU what tensors held
    (torch.cuda.max_memory_allocated; the caching allocator reserves somewhat more), on a CPU the
    process's resident set (its high-water mark, which Linux lets us reset phase by phase)."""
    if accelerator.device.type == "cuda":
        peak, what = torch.cuda.max_memory_allocated(), "GPU memory allocated"
        torch.cuda.reset_peak_memory_stats()
    else:
        peak, what = host_memory_peak(), "host memory (RSS)"
    PHASE_PEAKS[phase] = peak
    return f"peak {what} while {phase}: {peak / 2**30:.2f} GB"


def check_resume(path, cfg, settings=SHAPE_SETTINGS):
    """Fail before any slow work when checkpoint `path` cannot continue this run (other tensor shapes)."""
    old, now = ckpt.checkpoint_config(path), cfg.as_dict()
    for key in settings:
        before = old.get(key)
        if before != now[key]:
            raise UserError(f"{path} was trained with {key}={before!r}, this run has {now[key]!r} — "
                            f"use the same --{key} to resume")


def resume_point(cfg, accelerator, settings=SHAPE_SETTINGS):
    """The checkpoint this run continues (RESUME_FROM, checked against the run's settings), or None for
    a new run; a new run may not mix with another run's results in OUTPUT_DIR (lora_tools/checkpoint.py)."""
    path = ckpt.resolve_resume(cfg.RESUME_FROM, cfg.OUTPUT_DIR)
    if cfg.RESUME_FROM == "latest":
        print0(f"RESUME_FROM=latest: {path or f'no checkpoint in {cfg.OUTPUT_DIR} yet, starting a new run'}")
    if path is not None:
        check_resume(path, cfg, settings)
    ckpt.claim_output_dir(cfg.OUTPUT_DIR, path, cfg.OVERWRITE_OUTPUT_DIR, accelerator.is_main_process, print0)
    accelerator.wait_for_everyone()  # no process goes on while the main one may still be clearing the folder
    return path


# =============================================================================
# 2. Data: read and check the captioned images
# =============================================================================
def load_captioned_images(cfg, show_progress=True, captions_needed=True):
    """(images, captions): images is a list of file paths or PIL images, captions a list of str.
    Every image is decoded once here, so a broken file is skipped now, not hours into training."""
    if cfg.DATA_DIR is not None:
        records = read_folder(cfg.DATA_DIR, cfg.CAPTION_COLUMN, log=print0, captions_needed=captions_needed)
        images, captions = [r[0] for r in records], [r[1] for r in records]
    else:
        from datasets import load_dataset  # only for hub datasets (heavy to import)

        try:
            ds = load_dataset(cfg.DATASET_NAME, split="train")
        except (OSError, ConnectionError) as e:
            raise UserError(explain_load_error("DATASET_NAME", cfg.DATASET_NAME, e)) from None
        image_col = pick_column(ds.column_names, cfg.IMAGE_COLUMN, IMAGE_COLUMN_GUESSES, "images",
                                "IMAGE_COLUMN")
        images = HubImages(ds, image_col)
        captions = [""] * len(ds)
        if captions_needed:
            caption_col = pick_column(ds.column_names, cfg.CAPTION_COLUMN, CAPTION_COLUMN_GUESSES, "captions",
                                      "CAPTION_COLUMN")
            captions = [str(c or "") for c in ds[caption_col]]
    n = len(captions) if cfg.MAX_TRAIN_SAMPLES is None else min(cfg.MAX_TRAIN_SAMPLES, len(captions))
    kept, skipped, readable = [], [], {}
    for i in tqdm(range(n), desc="checking images", disable=not show_progress):
        if isinstance(images, list) and images[i] in readable:  # a file listed again (kohya's repeats)
            if readable[images[i]]:
                kept.append(i)
            continue
        try:
            img = images[i]
            open_image(img) if isinstance(img, str) else img.load()
            kept.append(i)
        except Exception as e:  # truncated, corrupt, or not an image at all: skip it, say which
            name = images[i] if isinstance(images, list) else f"row {i} of {cfg.DATASET_NAME}"
            skipped.append(f"{name} ({type(e).__name__})")
        if isinstance(images, list):
            readable[images[i]] = kept[-1:] == [i]
    where = cfg.DATA_DIR or cfg.DATASET_NAME
    if not kept:
        raise UserError(f"none of the {n} images in {where!r} could be read ({', '.join(skipped[:3])}) — "
                        "check the files")
    if skipped:
        more = ", ..." if len(skipped) > 3 else ""
        print0(f"skipped {len(skipped)} unreadable image(s) of {n}: {', '.join(skipped[:3])}{more}; "
               f"training on {len(kept)}")
    images = images.select(kept) if isinstance(images, HubImages) else [images[i] for i in kept]  # (lazy)
    return images, [captions[i] for i in kept]


def picture_keys(images):
    """One key per example, the same for a file listed several times (kohya's repeats): its path, else
    its index (a hub row, a picture in memory)."""
    if not isinstance(images, list):
        return list(range(len(images)))
    return [img if isinstance(img, str) else i for i, img in enumerate(images)]


def bucket_sizes(images, cfg, log=True):
    """ASPECT_RATIO_BUCKETING: each picture's (height, width) bucket, from its size (lora_tools/buckets.py);
    the table of buckets printed once."""
    known, sizes = {}, []
    for i, key in enumerate(picture_keys(images)):
        if key not in known:
            width, height = picture_size(images[i])  # from the header: the check above decoded it once
            known[key] = pick_bucket(width, height, cfg.RESOLUTION, cfg.BUCKET_STEP, cfg.BUCKET_UPSCALE)
        sizes.append(known[key])
    if log:
        print0(f"aspect-ratio buckets (height x width: pictures): {describe_buckets(sizes)}")
    return sizes


def split_validation(images, captions, cfg):
    """VALIDATION_SPLIT: (training images, captions), (held-out images, captions). The held-out pictures
    (a fraction, or a number) are picked by SEED; a picture listed several times stays on one side."""
    if cfg.VALIDATION_SPLIT is None:
        return (images, captions), ([], [])
    keys = picture_keys(images)
    unique = list(dict.fromkeys(keys))
    split = cfg.VALIDATION_SPLIT
    n = max(1, round(split * len(unique))) if isinstance(split, float) else split
    if n >= len(unique):
        raise UserError(f"VALIDATION_SPLIT={split!r} holds out {n} of {len(unique)} images, leaving none to "
                        f"train on — hold out fewer (e.g. --VALIDATION_SPLIT=0.1)")
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(cfg.SEED)).tolist()
    held = {unique[j] for j in order[:n]}
    sides = [[i for i, k in enumerate(keys) if (k in held) == side] for side in (False, True)]

    def pick(idx):
        return images.select(idx) if isinstance(images, HubImages) else [images[i] for i in idx]

    print0(f"validation: {n} of {len(unique)} images held out (VALIDATION_SPLIT={split!r})")
    return tuple((pick(idx), [captions[i] for i in idx]) for idx in sides)


# =============================================================================
# 3. Load Stable Diffusion and freeze it
# =============================================================================
@dataclass
class StableDiffusion:
    """The parts of a latent diffusion model (Rombach et al. 2022, LDM Sec. 3) that training uses."""

    family: Family  # SD 1.x/2.x (lora_tools/family.py): how the prompt conditions the UNet
    tokenizers: tuple  # text -> token ids, one per text encoder
    text_encoders: tuple  # τθ(y): token ids -> vectors the UNet attends to
    vae: AutoencoderKL  # E(x) -> z, 8x smaller per side, and D(z) -> x; None once the latents are cached
    unet: UNet2DConditionModel  # εθ(z_t, t, c): the network LoRA adapts
    noise_scheduler: DDPMScheduler  # the forward process q(z_t | z0): ᾱ_t for every t
    latent_scale: float  # the VAE's scaling_factor: z0 = E(x) x this has about unit variance (SD1.x: 0.18215)
    vae_scale: int  # pixels per latent, per side (SD1.x: 8, so 512 px -> 64 x 64 latents)


def vae_dtype(cfg, dtype):
    """The VAE's dtype: fp32 with VAE_FP32, and under fp16 when its config asks (force_upcast: SDXL's VAE
    overflows to NaN in fp16, and diffusers' pipelines upcast it too); else the frozen weights' dtype."""
    if cfg.VAE_FP32 or dtype == torch.float16 and AutoencoderKL.load_config(
            cfg.MODEL_ID, subfolder="vae", revision=cfg.REVISION).get("force_upcast", True):
        return torch.float32
    return dtype


def load_pipeline(cfg, family, dtype, **parts):
    """DiffusionPipeline.from_pretrained(MODEL_ID): the pipeline class its model_index.json names, in
    `dtype`, the VAE in vae_dtype; parts: components to use instead of MODEL_ID's."""
    dtypes = {"default": dtype, "vae": vae_dtype(cfg, dtype)}
    try:
        pipe = DiffusionPipeline.from_pretrained(cfg.MODEL_ID, revision=cfg.REVISION, dtype=dtypes,
                                                 **dict(family.pipeline_kwargs), **parts)
    except OSError as e:  # huggingface_hub's not-found / offline / connection errors are OSErrors
        raise UserError(explain_load_error("MODEL_ID", cfg.MODEL_ID, e)) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_models(cfg, family, weight_dtype):
    """The pipeline's parts, frozen weights straight in the mixed-precision dtype (half fp32's memory).
    Training always noises with DDPM (Ho et al. 2020), whatever sampler the model ships for drawing."""
    pipe = load_pipeline(cfg, family, weight_dtype)
    tokenizers = tuple(getattr(pipe, tok) for tok, _ in family.text_parts)
    text_encoders = tuple(getattr(pipe, te) for _, te in family.text_parts)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return StableDiffusion(family, tokenizers, text_encoders, pipe.vae, pipe.unet, noise_scheduler,
                           pipe.vae.config.scaling_factor, pipe.vae_scale_factor)


def freeze(*models):
    """W0 stays fixed (Hu et al. 2021, Sec. 4.1): no gradients, no optimizer state, no change."""
    for m in models:
        m.requires_grad_(False)
        m.eval()  # no dropout in the frozen parts


def count_params(model, trainable=None):
    return sum(p.numel() for p in model.parameters() if trainable is None or p.requires_grad == trainable)


def frozen_dtype(model):
    """The dtype of a model's frozen weights (its LoRA weights are fp32 whatever this is)."""
    return next(p.dtype for p in model.parameters() if not p.requires_grad)


# =============================================================================
# 4. Add LoRA adapters (Hu et al. 2021, Sec. 4.1, Eq. 3)
# =============================================================================
# What PEFT puts around each target nn.Linear `base` (its frozen weight W0 is d_out x d_in):
#
#     class LoraLinear(nn.Module):
#         def forward(self, x):                                         # x: (..., d_in)
#             return self.base(x) + self.B(self.A(self.dropout(x))) * self.alpha / self.r
#     A = nn.Linear(d_in, r, bias=False)    # "gaussian" init: A ~ N(0, 1/r²)
#     B = nn.Linear(r, d_out, bias=False)   # zero init, so B·A = 0: training starts exactly at W0
#
# so h = W0·x + (α/r)·B·A·x, and only A and B (r·(d_in + d_out) numbers per layer) are trained.
def lora_config(cfg, target_modules, **extra):
    return LoraConfig(r=cfg.LORA_RANK, lora_alpha=cfg.LORA_ALPHA, lora_dropout=cfg.LORA_DROPOUT,
                      init_lora_weights="gaussian", target_modules=list(target_modules),
                      use_dora=cfg.USE_DORA, use_rslora=cfg.USE_RSLORA, **extra)


def check_target_modules(model, targets, setting):
    """Each name must match a Linear layer of the model, or PEFT would train nothing there."""
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if not missing:
        return
    # name the projections inside its attention modules: "to_q", "to_out.0", "q_proj", ...
    attention = sorted({".".join(n.split(".")[max(i for i, p in enumerate(n.split(".")) if "attn" in p) + 1:])
                        for n in linear if "attn" in n})
    what = type(model).__name__
    if not attention:  # demo_base/'s text encoder has no transformer layers (lora_tools/demo_base.py: why)
        raise UserError(f"{setting} {missing}: the {what} has no attention layers to adapt — "
                        "train without it")
    raise UserError(f"{setting} {missing} match no layer of the {what}; its attention projections "
                    f"are {attention} — e.g. --{setting}={','.join(attention)}")


def add_lora(model, cfg, target_modules, setting="TARGET_MODULES", **extra):
    """Wrap each target Linear of `model` (the UNet or a text encoder) with a LoRA branch.
    Returns the new trainable tensors, in fp32 whatever dtype the frozen weights have."""
    check_target_modules(model, target_modules, setting)
    config = lora_config(cfg, target_modules, **extra)
    if isinstance(model, ModelMixin):  # diffusers' add_adapter also registers the adapter by name
        model.add_adapter(config)
    else:  # transformers' add_adapter wants PEFT >= 0.22; PEFT's own injection does the same thing
        inject_adapter_in_model(config, model, adapter_name="default")
    # fp32 master weights: bf16 has 8 bits of mantissa, too few for small updates
    cast_training_params(model, dtype=torch.float32)
    return [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]


def describe_lora(cfg, trainable, base_params):
    """Two lines: the adapter's shape and scale, and how many numbers train (of how many frozen)."""
    n = sum(p.numel() for p in trainable)
    scale = cfg.LORA_ALPHA / (math.sqrt(cfg.LORA_RANK) if cfg.USE_RSLORA else cfg.LORA_RANK)
    rule, dora = ("α/√r" if cfg.USE_RSLORA else "α/r"), (", DoRA" if cfg.USE_DORA else "")
    print0(f"LoRA r={cfg.LORA_RANK}, α={cfg.LORA_ALPHA} (scale {rule} = {scale:g}{dora}) on "
           f"{list(cfg.TARGET_MODULES)}{' + text encoder' if cfg.TRAIN_TEXT_ENCODER else ''}")
    print0(f"trainable LoRA parameters: {n:,} = {100 * n / base_params:.3f}% of the UNet's {base_params:,} "
           "(frozen)")


def lora_state_dict(models, dtype=torch.float32):
    """The LoRA tensors of {component name: model} under diffusers' key names ('unet.' / 'text_encoder.'
    prefixes: the pipeline component each layer lives in), on the CPU."""
    tensors = {}
    for prefix, model in models.items():
        # the LoRA layers' tensors only (lora_A, lora_B, DoRA's magnitudes), not other trained rows
        peft_sd = {k: v for k, v in get_peft_model_state_dict(model).items() if "lora_" in k}
        if not peft_sd:
            continue
        sd = convert_state_dict_to_diffusers(peft_sd)
        tensors.update({f"{prefix}.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in sd.items()})
    return tensors


def lora_metadata(models, cfg):
    """safetensors metadata: diffusers reads 'lora_adapter_metadata' (rank, alpha, targets, DoRA/rsLoRA)
    to rebuild each adapter at its trained strength; 'training_config' records how it was made."""
    lora_meta = {}
    for prefix, model in models.items():
        if model.peft_config["default"].peft_type != PeftType.LORA:  # e.g. only embedding rows trained there
            continue
        config = model.peft_config["default"].to_dict()
        config.pop("trainable_token_indices", None)  # embedding rows trained beside it are not in this file
        config["lora_dropout"] = 0.0  # LORA_DROPOUT regularises training; a loader would build live dropout
        lora_meta.update({f"{prefix}.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.items()})
    return {"format": "pt", "lora_adapter_metadata": json.dumps(lora_meta, sort_keys=True, default=str),
            "training_config": cfg.to_json()}


# =============================================================================
# 5. Encode the data once: pixels and tokens -> latents and text embeddings
# =============================================================================
def tokenize(tokenizers, captions):
    """Captions -> token ids (N, n_text_encoders, 77), each tokenizer padding to its 77 positions."""
    limit = tokenizers[0].model_max_length
    lengths = [len(ids) for ids in tokenizers[0](list(captions), truncation=False, verbose=False).input_ids]
    too_long = [c for c, n in zip(captions, lengths) if n > limit]
    if too_long:
        print0(f"note: {len(too_long)} caption(s) are longer than the text encoder's {limit} tokens and "
               f"were cut (e.g. {too_long[0][:60]!r}...)")
    return torch.stack([tok(list(captions), padding="max_length", max_length=tok.model_max_length,
                            truncation=True, return_tensors="pt").input_ids for tok in tokenizers], dim=1)


def caption_dropped(seed, p):
    """Caption dropout: whether an example trains with the empty caption this time, with probability p
    (CAPTION_DROPOUT), drawn from the example's own seed for this epoch (EpochShuffle's), so a resumed
    run and any split over GPUs drop the same ones. Classifier-free guidance subtracts the model's
    prediction for the empty prompt (tutorial 3.8); trained on captions only, that prediction drifts."""
    if seed is None or not p:
        return False
    g = torch.Generator().manual_seed(seed ^ 0xD809)  # a stream of its own, not the noise's
    return torch.rand((), generator=g).item() < p


class CaptionedImages(torch.utils.data.Dataset):
    """Item (i, flip, seed): pixels in [-1, 1] (3, R, R), mirrored if flip; token ids (n_encoders, 77), the
    empty caption's if it is dropped (CAPTION_DROPOUT; empty_ids: tokenize(tokenizers, [""])[0]); the
    picture's size and crop, (6,): original height, width, crop top, left (in the resized picture), target
    height, width (SDXL's micro-conditioning; SD 1.x ignores it); the example's random seed for this epoch;
    its weight in the loss (1). Seed None (caching) drops no caption. sizes: each picture's (height, width)
    bucket (ASPECT_RATIO_BUCKETING, lora_tools/buckets.py), or None: every picture an R x R square."""

    def __init__(self, images, input_ids, cfg, empty_ids=None, sizes=None):
        self.images, self.input_ids, self.empty_ids, self.sizes = images, input_ids, empty_ids, sizes
        self.size, self.center_crop = cfg.RESOLUTION, cfg.CENTER_CROP
        self.caption_dropout = cfg.CAPTION_DROPOUT
        assert empty_ids is not None or not self.caption_dropout, "caption dropout needs the empty caption"

    def __len__(self):
        return len(self.input_ids)

    def target_size(self, i):
        """(height, width) that picture i trains at."""
        return tuple(self.sizes[i]) if self.sizes else (self.size, self.size)

    def __getitem__(self, item):
        i, flip, seed = item if isinstance(item, tuple) else (item, False, 0)
        img = self.images[i]
        img = open_image(img) if isinstance(img, str) else to_rgb(img)
        (H, W), (w, h) = self.target_size(i), img.size
        if self.sizes:  # its bucket: resized to cover it (never up: a small picture's bucket is its size)
            scale = max(H / h, W / w)
            img = tvf.resize(img, [max(H, round(h * scale)), max(W, round(w * scale))],
                             interpolation=tvf.InterpolationMode.BILINEAR)
        else:  # the short side -> R
            img = tvf.resize(img, H, interpolation=tvf.InterpolationMode.BILINEAR)
        if self.center_crop:  # (torchvision's CenterCrop rounding)
            top, left = round((img.height - H) / 2), round((img.width - W) / 2)
        else:
            top, left, _, _ = transforms.RandomCrop.get_params(img, (H, W))
        pixels = tvf.to_tensor(tvf.crop(img, top, left, H, W))  # (3, H, W) in [0, 1]
        pixels = tvf.normalize(pixels, [0.5], [0.5])  # -> [-1, 1], the range the VAE was trained on
        if flip:  # the mirror image, and where its crop sits in the mirrored picture
            pixels, left = pixels.flip(-1), img.width - left - W
        dropped = caption_dropped(seed, self.caption_dropout)
        ids = self.empty_ids if dropped else self.input_ids[i]
        return {"pixel_values": pixels, "input_ids": ids, "seed": seed,
                "time_ids": torch.tensor([h, w, top, left, H, W], dtype=torch.float32),
                "caption_dropped": torch.tensor(dropped), "loss_weight": torch.tensor(1.0)}


class CachedLatents(torch.utils.data.Dataset):
    """Item (i, flip, seed): the VAE posterior (mean, std) of image i (4, R/8, R/8), of its mirror
    image if flip, with that view's size and crop, and its caption's text conditioning (or its token
    ids, when a text encoder trains); a dropped caption's is the empty caption's, their last row. z0 is
    still sampled from the posterior at every step (compute_loss). rows: example i's row of the cache (a
    picture listed several times is cached once); None = row i."""

    def __init__(self, mean, std, time_ids, text, input_ids, caption_dropout=0.0, rows=None):
        self.mean, self.std, self.time_ids = mean, std, time_ids  # (rows, 1 or 2 views, ...)
        self.text, self.input_ids = text, input_ids  # text: {name: (rows [+ 1], ...)} or None
        self.caption_dropout = caption_dropout
        self.rows = torch.arange(len(mean)) if rows is None else rows

    def __len__(self):
        return len(self.rows)

    def target_size(self, i):
        return tuple(int(v) for v in self.time_ids[self.rows[i]][0, 4:])  # (target height, width)

    def __getitem__(self, item):
        i, flip, seed = item if isinstance(item, tuple) else (item, False, 0)
        r = self.rows[i]
        dropped = caption_dropped(seed, self.caption_dropout)
        text_row = -1 if dropped else r  # the empty caption is the last row
        if self.text:
            text = {k: v[text_row] for k, v in self.text.items()}
        else:
            text = {"input_ids": self.input_ids[text_row]}
        view = int(flip)  # view 1 = the mirrored image
        return {"latent_mean": self.mean[r][view], "latent_std": self.std[r][view], **text, "seed": seed,
                "time_ids": self.time_ids[r][view], "caption_dropped": torch.tensor(dropped),
                "loss_weight": torch.tensor(1.0)}


@torch.no_grad()
def encode_images(vae, pixels):
    """E(x): pixels (B, 3, R, R) -> posterior mean and std, each (B, 4, R/8, R/8)."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    # contiguous: on a CPU the VAE hands back channels-last tensors, which the UNet would then inherit
    return dist.mean.contiguous(), dist.std.contiguous()


def trains(model):
    return model is not None and any(p.requires_grad for p in model.parameters())


def text_encoder_trains(sd):
    """Whether a text encoder's output changes during training (then prompts cannot be cached)."""
    return any(trains(te) for te in sd.text_encoders)


def collate(items):
    """A batch of examples: default_collate, with each example's seed kept a Python int (it seeds a
    generator; a tensor would be copied to the GPU and read back, a sync)."""
    batch = torch.utils.data.default_collate([{k: v for k, v in it.items() if k != "seed"} for it in items])
    return batch | {"seed": [it["seed"] for it in items]}


@torch.no_grad()
def cache_latents(dataset, sd, cfg, show_progress=True):
    """Run the frozen encoders once over the data: each picture, and its mirror image when RANDOM_FLIP.
    A file listed several times (kohya's <repeats>_<name>/ folders) is encoded and kept once."""
    workers = min(4, max(0, (os.cpu_count() or 1) - 1))
    keys = picture_keys(dataset.images)
    row_of, firsts = {}, []  # each picture's row in the cache, and the first example showing it
    for i, key in enumerate(keys):
        if key not in row_of:
            row_of[key] = len(firsts)
            firsts.append(i)
    # batches of one size (buckets: ASPECT_RATIO_BUCKETING), else simply in order
    sizes = [dataset.target_size(i) for i in firsts]
    by_size = sorted(range(len(firsts)), key=lambda r: sizes[r])
    batches = [group[j:j + cfg.BATCH_SIZE] for _, rows in itertools.groupby(by_size, key=lambda r: sizes[r])
               for group in [list(rows)] for j in range(0, len(group), cfg.BATCH_SIZE)]
    views, text_rows = [], [None] * len(firsts)  # per view: each row's posterior mean, std, size-and-crop ids
    # a trained text encoder, or shuffled tags, change a prompt's encoding every step: nothing to cache
    prompt_changes = text_encoder_trains(sd) or cfg.SHUFFLE_CAPTION_TAGS
    for flip in [False, True] if cfg.RANDOM_FLIP else [False]:
        picks = [[(firsts[r], flip, None) for r in rows] for rows in batches]  # (index, flip, no seed)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=picks, num_workers=workers,
                                             collate_fn=collate)
        means, stds, ids = [None] * len(firsts), [None] * len(firsts), [None] * len(firsts)
        loop = tqdm(loader, desc="caching latents" + " (mirrored)" * flip, disable=not show_progress)
        for rows, batch in zip(batches, loop):
            mean, std = encode_images(sd.vae, batch["pixel_values"])
            if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
                raise UserError(f"the VAE ({sd.vae.dtype}) turned pictures into NaN/inf latents — SDXL's "
                                "VAE overflows in fp16: use --MIXED_PRECISION=bf16 or --VAE_FP32=True")
            text = None
            if not flip and not prompt_changes:
                text = encode_prompt(sd.family, sd.text_encoders, batch["input_ids"])
            for j, r in enumerate(rows):
                means[r], stds[r], ids[r] = mean[j].cpu(), std[j].cpu(), batch["time_ids"][j]
                if text is not None:
                    text_rows[r] = {k: v[j].cpu() for k, v in text.items()}
        views.append((means, stds, ids))
    # per row (views, ...): one tensor (N, views, ...) when every picture has one size, else a list
    mean, std, time_ids = ([torch.stack(parts) for parts in zip(*per_view)] for per_view in zip(*views))
    mean, std, time_ids = (torch.stack(x) if len({t.shape for t in x}) == 1 else x
                           for x in (mean, std, time_ids))
    texts = [t for t in text_rows if t is not None]
    input_ids = dataset.input_ids[firsts]
    if dataset.caption_dropout:  # the empty caption, encoded once, as the last row (SDXL's: zeros)
        input_ids = torch.cat([input_ids, dataset.empty_ids[None]])
        if texts:
            text = encode_prompt(sd.family, sd.text_encoders, dataset.empty_ids[None], torch.tensor([True]))
            texts.append({k: v[0].cpu() for k, v in text.items()})
    text = {k: torch.stack([t[k] for t in texts]) for k in texts[0]} if texts else None  # e.g. (N, 77, d)
    # not pinned: the DataLoader collates a new tensor per batch and pins that one (pin_memory=True)
    rows = torch.tensor([row_of[key] for key in keys])
    return CachedLatents(mean, std, time_ids, text, input_ids, dataset.caption_dropout, rows)


def shuffle_tags(caption, seed, keep):
    """SHUFFLE_CAPTION_TAGS: a comma-separated tag caption in an order drawn from the example's seed for
    this epoch, its first `keep` tags (KEEP_TAGS) in place: the model learns the tags, not their order."""
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep], tags[keep:]
    order = torch.randperm(len(tail), generator=torch.Generator().manual_seed(seed ^ 0x7A65)).tolist()
    return ", ".join(head + [tail[i] for i in order])


class ShuffledTags(torch.utils.data.Dataset):
    """The examples of `dataset` with their captions' tags shuffled (shuffle_tags) and tokenized for this
    draw: a prompt that changes every time has no fixed encoding to cache (cache_latents keeps token ids),
    so the text encoders run at every step (compute_loss encodes them). A dropped caption stays empty."""

    def __init__(self, dataset, captions, tokenizers, keep):
        self.dataset, self.captions, self.tokenizers, self.keep = dataset, captions, tokenizers, keep
        self.target_size = dataset.target_size

    def token_ids(self, text):
        return torch.stack([tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                                return_tensors="pt").input_ids[0] for tok in self.tokenizers])

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        i, flip, seed = item if isinstance(item, tuple) else (item, False, 0)
        example = self.dataset[(i, flip, seed)]
        if not example["caption_dropped"]:  # (a dropped one holds the empty caption's ids already)
            example["input_ids"] = self.token_ids(shuffle_tags(self.captions[i], seed, self.keep))
        return example


def validation_data(images, captions, sd, cfg):
    """The held-out pictures (VALIDATION_SPLIT) as the validation loss reads them: never flipped, never a
    caption dropped, encoded once like the training data (CACHE_LATENTS). None without held-out pictures."""
    if not captions:
        return None
    cfg = cfg.replace(RANDOM_FLIP=False, CAPTION_DROPOUT=0.0)
    sizes = bucket_sizes(images, cfg, log=False) if cfg.ASPECT_RATIO_BUCKETING else None
    data = CaptionedImages(images, tokenize(sd.tokenizers, captions), cfg, sizes=sizes)
    return cache_latents(data, sd, cfg, show_progress=False) if cfg.CACHE_LATENTS else data


class EpochShuffle(torch.utils.data.Sampler):
    """Yields (index, flip, seed) triples: a fresh permutation, fresh flips and a fresh random seed per
    example every epoch, all a pure function of (SEED, epoch). So a resumed run replays exactly the same
    data without saving sampler state, every process of a multi-GPU run draws the same order
    (accelerate gives each its share), and an example's noise does not depend on the batch it is in."""

    def __init__(self, n, seed, random_flip):
        self.n, self.seed, self.random_flip, self.epoch = n, seed, random_flip, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        flips = (torch.rand(self.n, generator=g) < 0.5).tolist() if self.random_flip else [False] * self.n
        seeds = torch.randint(0, 2**62, (self.n,), generator=g).tolist()
        return iter(zip(order, flips, seeds))

    def __len__(self):
        return self.n


def make_dataloader(dataset, cfg, cuda, collate_fn=collate):
    workers = cfg.DATALOADER_NUM_WORKERS
    if workers is None:  # cached latents are a tensor lookup; images need decoding
        workers = 0 if cfg.CACHE_LATENTS else min(4, max(0, (os.cpu_count() or 1) - 1))
    sampler = EpochShuffle(len(dataset), cfg.SEED, cfg.RANDOM_FLIP)
    batching = dict(batch_size=cfg.BATCH_SIZE, sampler=sampler)
    if cfg.ASPECT_RATIO_BUCKETING:  # every batch from one bucket: their latents must stack
        sizes = [dataset.target_size(i) for i in range(len(dataset))]
        batching = dict(batch_sampler=BucketBatches(sampler, sizes, cfg.BATCH_SIZE, cfg.SEED))
    return torch.utils.data.DataLoader(dataset, **batching, num_workers=workers, pin_memory=cuda,
                                       persistent_workers=workers > 0, collate_fn=collate_fn,
                                       generator=torch.Generator().manual_seed(cfg.SEED))  # not global RNG


# =============================================================================
# 6. Train (DDPM, Ho et al. 2020, Algorithm 1 and Eq. 14, in latent space)
# =============================================================================
def min_snr_weights(noise_scheduler, t, gamma):
    """Min-SNR-γ (Hang et al. 2023, Sec. 3.4 and 4.2): weight each timestep's loss by min(SNR(t), γ),
    expressed for the network's target: ÷SNR(t) for ε-prediction, ÷(SNR(t)+1) for v-prediction."""
    snr = compute_snr(noise_scheduler, t)  # SNR(t) = ᾱ_t / (1 - ᾱ_t)
    clipped = torch.clamp(snr, max=gamma)  # min(SNR(t), γ)
    return clipped / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else clipped / snr


def draw_noise(seeds, shape, num_timesteps, noise_offset, device):
    """Each example's random numbers from its own generator, seeded by EpochShuffle: the sample of z0,
    the noise ε (+ offset noise) and the timestep t. So accumulating 2 micro-batches of 2 draws exactly
    what one batch of 4 draws, and so does a second GPU. Returns (sample, ε, t), (B, *shape) and (B,)."""
    sample, noise, t = [], [], []
    for seed in seeds:
        g = torch.Generator(device).manual_seed(seed)
        sample.append(torch.randn(shape, generator=g, device=device))
        eps = torch.randn(shape, generator=g, device=device)  # ε ~ N(0, I)
        if noise_offset:  # offset noise (Guttenberg 2023): one extra shift per channel, (4, 1, 1)
            eps = eps + noise_offset * torch.randn(shape[0], 1, 1, generator=g, device=device)
        noise.append(eps)
        t.append(torch.randint(0, num_timesteps, (), generator=g, device=device))
    return torch.stack(sample), torch.stack(noise), torch.stack(t)


def compute_loss(batch, sd, snr_gamma=None, noise_offset=0.0):
    """One denoising-loss evaluation: batch -> z0, c -> noise -> z_t -> prediction -> squared error,
    one loss per example (B,). A cached batch carries the encoders' outputs; otherwise the frozen
    encoders run now (what most trainers do at every step, though their output never changes)."""
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"], batch["latent_std"]
    else:
        mean, std = encode_images(sd.vae, batch["pixel_values"])
    if "input_ids" in batch:  # a trained text encoder: encode the prompt now
        text = encode_prompt(sd.family, sd.text_encoders, batch["input_ids"], batch.get("caption_dropped"))
    else:  # cached: the batch holds the prompt's encoding
        text = batch
    T = sd.noise_scheduler.config.num_train_timesteps
    sample, noise, t = draw_noise(batch["seed"], mean.shape[1:], T, noise_offset, mean.device)
    # z0 ~ E(x), scaled to unit variance (LDM Sec. 3.1); (B, 4, R/8, R/8)
    latents = (mean.float() + std.float() * sample) * sd.latent_scale
    # DDPM Eq. (4): z_t = √ᾱ_t·z0 + √(1-ᾱ_t)·ε
    noisy_latents = sd.noise_scheduler.add_noise(latents, noise, t)
    # εθ(z_t, t, τθ(y)); (B, 4, R/8, R/8)
    model_pred = sd.unet(noisy_latents, t, **unet_conditioning(text, batch), return_dict=False)[0]
    prediction_type = sd.noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise  # DDPM Eq. (14): ‖ε − εθ(z_t, t)‖²
    elif prediction_type == "v_prediction":  # v = √ᾱ_t·ε − √(1-ᾱ_t)·z0 (Salimans & Ho 2022)
        target = sd.noise_scheduler.get_velocity(latents, noise, t)
    else:
        raise UserError(f"the scheduler's prediction_type {prediction_type!r} is not supported "
                        "(epsilon or v_prediction)")
    loss = mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,), in fp32
    if snr_gamma is not None:
        loss = loss * min_snr_weights(sd.noise_scheduler, t, snr_gamma)
    return loss


VALIDATION_DRAWS = 8  # noise and timestep draws per held-out picture: the same seeds at every evaluation


@torch.no_grad()
def validation_loss(run):
    """The mean denoising loss on the held-out pictures, each with the same VALIDATION_DRAWS noises and
    timesteps every time (their seeds are fixed), so it is comparable across steps, runs and resumes: plain
    MSE (no Min-SNR weights, no offset noise), dropout off, with the plain (unwrapped) trained models."""
    models, acc = run.models(), run.accelerator
    names = [te for _, te in run.sd.family.text_parts]
    parts = dict(zip(names, run.sd.text_encoders)) | models  # the trained ones unwrapped
    sd = replace(run.sd, unet=parts["unet"], text_encoders=tuple(parts[te] for te in names))
    bs, draws = run.cfg.BATCH_SIZE, VALIDATION_DRAWS
    batches = [[(i, False, i * draws + k) for k in range(j, min(j + bs, draws))]  # one picture a batch
               for i in range(len(run.validation)) for j in range(0, draws, bs)]
    for m in models.values():
        m.eval()
    total = 0.0
    for examples in batches:
        batch = collate([run.validation[e] for e in examples])
        batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with acc.autocast():
            total += compute_loss(batch, sd).sum().item()
    for m in models.values():
        m.train()
    return total / (len(run.validation) * draws)


def lora_param_groups(models, cfg):
    """AdamW parameter groups over the LoRA tensors of [(model, learning rate)]: LoRA+ (Hayou et al.
    2024) lets the B matrices learn at LEARNING_RATE x LORAPLUS_LR_RATIO; a text encoder has its own rate."""
    groups = []
    for model, lr in models:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        b_lr = lr * (cfg.LORAPLUS_LR_RATIO or 1.0)
        groups.append({"params": [p for n, p in named if "lora_B" not in n], "lr": lr})  # A, DoRA magnitudes
        groups.append({"params": [p for n, p in named if "lora_B" in n], "lr": b_lr})
    return [g for g in groups if g["params"]]


def make_optimizer(groups, cfg, cuda):
    """AdamW: fused into one kernel on a GPU, multi-tensor (foreach) on a CPU; or 8-bit (bitsandbytes)."""
    if cfg.USE_8BIT_ADAM:
        import bitsandbytes as bnb  # optional; check_environment made sure it is installed

        if not cuda:
            raise UserError("USE_8BIT_ADAM=True needs a CUDA GPU — use --USE_8BIT_ADAM=False on a CPU")
        return bnb.optim.AdamW8bit(groups, lr=cfg.LEARNING_RATE, weight_decay=cfg.ADAM_WEIGHT_DECAY)
    return torch.optim.AdamW(groups, lr=cfg.LEARNING_RATE, weight_decay=cfg.ADAM_WEIGHT_DECAY,
                             fused=True if cuda else None, foreach=None if cuda else True)


@dataclass
class Run:
    """What the training loop works with, gathered once (main builds it with `prepare_run`)."""

    cfg: Config
    accelerator: Accelerator
    sd: StableDiffusion  # its trained models as accelerate prepared them (DDP / torch.compile wrappers)
    trained: tuple  # component names of the models being trained: ("unet",) or ("unet", "text_encoder")
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    dataloader: torch.utils.data.DataLoader
    steps_per_epoch: int
    max_steps: int
    command: tuple = ()  # the script and its command line, for the resume command printed on Ctrl-C
    validation: object = None  # the held-out pictures (VALIDATION_SPLIT), or None

    def models(self):
        """{component name: model} of the trained models, unwrapped: the names their LoRA files use."""
        sd = self.sd
        parts = {"unet": sd.unet, **{te: m for (_, te), m in zip(sd.family.text_parts, sd.text_encoders)}}
        plain = {n: self.accelerator.unwrap_model(parts[n], keep_torch_compile=False) for n in self.trained}
        return {n: getattr(m, "_orig_mod", m) for n, m in plain.items()}  # torch.compile's wrapper inside DDP

    def adapter_files(self, dtype=torch.float32):
        """The usable files of the adapter as it is now: {file name: (tensors, safetensors metadata)}."""
        models = self.models()
        return {WEIGHTS_NAME: (lora_state_dict(models, dtype), lora_metadata(models, self.cfg))}


def prepare_run(cfg, accelerator, sd, dataset, param_groups, command=(), collate_fn=collate, run_class=Run):
    """Optimizer, data loader and schedule, and the models handed to accelerate (DDP across GPUs)."""
    cuda = accelerator.device.type == "cuda"
    optimizer = make_optimizer(param_groups, cfg, cuda)
    names = ("unet",) + tuple(te for (_, te), m in zip(sd.family.text_parts, sd.text_encoders) if trains(m))
    sd.unet = torch.compile(sd.unet) if cfg.COMPILE else sd.unet
    dataloader = make_dataloader(dataset, cfg, cuda, collate_fn)
    sd.unet, optimizer, dataloader = accelerator.prepare(sd.unet, optimizer, dataloader)
    sd.text_encoders = tuple(accelerator.prepare(m) if te in names else m
                             for (_, te), m in zip(sd.family.text_parts, sd.text_encoders))
    steps_per_epoch = math.ceil(len(dataloader) / cfg.GRADIENT_ACCUMULATION_STEPS)
    max_steps = cfg.MAX_TRAIN_STEPS or cfg.NUM_EPOCHS * steps_per_epoch
    lr_scheduler = get_scheduler(cfg.LR_SCHEDULER, optimizer=optimizer, num_warmup_steps=cfg.LR_WARMUP_STEPS,
                                 num_training_steps=max_steps)  # stepped once per optimizer step
    return run_class(cfg, accelerator, sd, names, optimizer, lr_scheduler, dataloader, steps_per_epoch,
                     max_steps, tuple(command))


def describe_run(run, data):
    """One line of the facts derived from the settings: sizes, effective batch, steps, epochs."""
    cfg, processes = run.cfg, run.accelerator.num_processes
    latent = cfg.RESOLUTION // run.sd.vae_scale
    print0(f"{data} at {cfg.RESOLUTION}px (latents 4x{latent}x{latent}) | effective batch "
           f"{cfg.BATCH_SIZE * cfg.GRADIENT_ACCUMULATION_STEPS * processes} = {cfg.BATCH_SIZE} x "
           f"{cfg.GRADIENT_ACCUMULATION_STEPS} accumulation x {processes} process(es) | "
           f"{run.steps_per_epoch} steps/epoch, {run.max_steps} steps, "
           f"{math.ceil(run.max_steps / run.steps_per_epoch)} epochs | "
           f"{'cached latents' if cfg.CACHE_LATENTS else 'encoding every step'}")


# --- checkpoints: everything an exact continuation needs, in one dict (lora_tools/checkpoint.py) ---------
def save_checkpoint(run, step):
    """checkpoint-<step>/ (the main process writes; every process hands in its random-number states)."""
    rngs = gather_object([ckpt.rng_states()])  # [process 0's, process 1's, ...] on every process
    if not run.accelerator.is_main_process:
        return None
    scaler = run.accelerator.scaler
    checkpoint = {
        "step": step,
        "trainable": {f"{name}.{n}": p.detach().float().cpu() for name, m in run.models().items()
                      for n, p in m.named_parameters() if p.requires_grad},
        "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rngs,
    }
    return ckpt.save_checkpoint(run.cfg.OUTPUT_DIR, checkpoint, run.adapter_files(), run.cfg.to_json(),
                                run.cfg.CHECKPOINTS_TOTAL_LIMIT)


def restore_checkpoint(run, path):
    """Put checkpoint `path` back into the run. Returns (step, this process's RNG states, or None)."""
    checkpoint = ckpt.load_checkpoint(path)
    old, now = ckpt.checkpoint_config(path), run.cfg.as_dict()
    changed = [k for k in ("BATCH_SIZE", "GRADIENT_ACCUMULATION_STEPS", "SEED", "LORA_ALPHA", "LEARNING_RATE")
               if old.get(k) != now[k]]
    acc = run.accelerator
    if len(checkpoint["rng"]) != acc.num_processes:
        changed.append(f"the number of processes ({len(checkpoint['rng'])} then, {acc.num_processes} now)")
    if changed:
        print0(f"note: {', '.join(changed)} differ from the checkpoint's run: the continuation is not exact")
    ckpt.restore_trainable(run.models(), checkpoint["trainable"], path)
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if acc.scaler is not None and checkpoint["scaler"] is not None:
        acc.scaler.load_state_dict(checkpoint["scaler"])
    rngs = checkpoint["rng"]
    return checkpoint["step"], rngs[acc.process_index] if acc.process_index < len(rngs) else None


class StopRequest:
    """Ctrl-C / SIGTERM set a flag; the loop checkpoints at the next step boundary and exits.
    A second Ctrl-C stops at once."""

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print0("\nstop requested: saving a checkpoint after this step (Ctrl-C again to quit at once)")

    def agreed(self, accelerator, sync_now):
        """Whether to stop now. Several processes must agree, or one would wait for the others
        forever; comparing flags is a sync, so they compare only where they sync anyway."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        if not sync_now:
            return False
        flag = torch.tensor(float(self.signum is not None), device=accelerator.device)
        return bool(accelerator.reduce(flag, "max").item())

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class MetricsLog:
    """OUTPUT_DIR/metrics.jsonl, one line {step, loss, lr, epoch, grad_norm} per LOG_EVERY optimizer steps
    (a resumed run keeps the lines up to its checkpoint's step), and tensorboard when REPORT_TO."""

    def __init__(self, cfg, accelerator, resume_step):
        self.path = os.path.join(cfg.OUTPUT_DIR, "metrics.jsonl")
        self.accelerator, self.report = accelerator, cfg.REPORT_TO
        if accelerator.is_main_process:
            kept = []
            if resume_step and os.path.exists(self.path):  # (read_metrics skips a line a crash cut short)
                kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if cfg.REPORT_TO:
            plain = lambda v: v if isinstance(v, (int, float, str, bool)) else str(v)  # noqa: E731
            accelerator.init_trackers("lora", config={k: plain(v) for k, v in cfg.as_dict().items()})

    def write(self, record):
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.report:
            scalars = {k: v for k, v in record.items() if k not in ("step", "epoch")}
            self.accelerator.log(scalars, step=record["step"])


def save_png(image, path):
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def render(pipe, cfg, prompts, seeds):
    """One image per (prompt, seed), each from its own CPU generator: the same noise on any device."""
    images = []
    for p in prompts:
        for s in seeds:
            kw = dict(height=cfg.RESOLUTION, width=cfg.RESOLUTION, guidance_scale=cfg.GUIDANCE_SCALE,
                      num_inference_steps=cfg.NUM_INFERENCE_STEPS, generator=torch.Generator().manual_seed(s))
            with torch.no_grad():
                if pipe.vae.dtype == pipe.unet.dtype:
                    images.append(pipe(p, **kw).images[0])
                else:  # VAE_FP32: the pipeline would feed fp16 latents to the fp32 VAE; decode them in fp32
                    latents = pipe(p, output_type="latent", **kw).images.to(pipe.vae.dtype)
                    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
                    images.append(pipe.image_processor.postprocess(decoded)[0])
    return images


@torch.no_grad()
def log_validation(run, step):
    """Mid-training pictures: the models being trained, in a pipeline (the other parts reloaded from
    MODEL_ID), rendering VALIDATION_PROMPTS at fixed seeds into validation/step-<N>.png."""
    cfg, sd = run.cfg, run.sd
    models = run.models()
    tokenizers = {tok: t for (tok, _), t in zip(sd.family.text_parts, sd.tokenizers)}  # may know new words
    pipe = load_pipeline(cfg, sd.family, frozen_dtype(models["unet"]), **models, **tokenizers)
    pipe.to(run.accelerator.device)
    for model in models.values():
        model.eval()
    seeds = [cfg.SEED + i for i in range(cfg.NUM_VALIDATION_SEEDS)]
    with run.accelerator.autocast():
        images = render(pipe, cfg, cfg.VALIDATION_PROMPTS, seeds)
    for model in models.values():
        model.train()
    grid = image_grid(images, rows=len(cfg.VALIDATION_PROMPTS), labels=[f"seed {s}" for s in seeds],
                      row_labels=list(cfg.VALIDATION_PROMPTS))
    path = os.path.join(cfg.OUTPUT_DIR, "validation", f"step-{step:06d}.png")
    save_png(grid, path)
    return path


def log_validation_loss(run, metrics, step):
    """The main process computes the validation loss and writes it to metrics.jsonl; the others wait."""
    if run.accelerator.is_main_process:
        metrics.write({"step": step, "val_loss": validation_loss(run)})
    run.accelerator.wait_for_everyone()


def optimizer_steps(dataloader, accumulation, first_epoch, skip):
    """The micro-batches of each optimizer step, in order, epoch after epoch: (epoch, [micro-batches]),
    `accumulation` of them, fewer at an epoch's end. A resumed run first skips `skip` micro-batches."""
    for epoch in itertools.count(first_epoch):
        dataloader.set_epoch(epoch)  # a new order, flips and seeds (EpochShuffle), the same on every process
        batches = iter(dataloader)
        for _ in range(skip):
            next(batches)
        skip = 0
        while group := list(itertools.islice(batches, accumulation)):
            yield epoch, group


def gradient_sync(accelerator, models, now):
    """DDP averages the gradients across processes after a backward pass: let it, only on the step's
    last micro-batch (accelerator.no_sync for the others; nothing to do with one process)."""
    stack = contextlib.ExitStack()
    if not now:
        for m in models:
            stack.enter_context(accelerator.no_sync(m))
    return stack


def resume_command(command, checkpoint):
    """`python <script> <its arguments> --RESUME_FROM=<checkpoint>`; command: (script, *arguments)."""
    script, *args = command or (os.path.basename(__file__),)
    kept = [a for a in args if not a.startswith("--RESUME_FROM=")]
    return shlex.join(["python", script, *kept, f"--RESUME_FROM={checkpoint}"])


def train(run, start_step=0, resume_rng=None):
    """The training loop, one optimizer step per iteration. Returns the number of optimizer steps done."""
    cfg, acc, sd = run.cfg, run.accelerator, run.sd
    trained = [sd.unet] + [m for m in sd.text_encoders if trains(m)]
    params = [p for g in run.optimizer.param_groups for p in g["params"]]  # all that trains: a list, clipped
    first_epoch, done_in_epoch = divmod(start_step, run.steps_per_epoch)
    steps = optimizer_steps(run.dataloader, cfg.GRADIENT_ACCUMULATION_STEPS, first_epoch,
                            skip=done_in_epoch * cfg.GRADIENT_ACCUMULATION_STEPS)
    metrics, stop = MetricsLog(cfg, acc, start_step), StopRequest()
    progress = tqdm(total=run.max_steps, initial=start_step, desc="training",
                    disable=not acc.is_local_main_process)
    window = torch.zeros(3, device=acc.device)  # summed over the log window: loss, grad norm, steps
    t0 = time.time()
    if acc.device.type == "cpu":
        keep_host_memory()  # glibc: reuse freed host memory step to step (free_memory, below, undoes it)
    for m in trained:
        m.train()
    if resume_rng is not None:  # exact resume: this process's random numbers (dropout) as at the checkpoint
        ckpt.set_rng_states(resume_rng)
    if run.validation is not None and start_step == 0:  # the held-out loss before any training
        log_validation_loss(run, metrics, 0)
    try:
        for step in range(start_step + 1, run.max_steps + 1):
            epoch, micro_batches = next(steps)

            # --- forward backward: the step's loss is the mean over all its examples, in any micro-batches
            n = sum(len(b["seed"]) for b in micro_batches)
            step_loss = 0.0
            for i, batch in enumerate(micro_batches):
                with gradient_sync(acc, trained, now=i == len(micro_batches) - 1), acc.autocast():
                    # noise -> predict -> loss: one per example, (B,)
                    losses = compute_loss(batch, sd, cfg.SNR_GAMMA, cfg.NOISE_OFFSET)
                    loss = (losses * batch["loss_weight"]).sum() / n  # this micro-batch's share of the mean
                acc.backward(loss)  # gradients reach the LoRA tensors only (fp16: the loss is scaled first)
                step_loss += loss.detach()

            # --- clip and update
            grad_norm = torch.zeros((), device=acc.device)
            if cfg.MAX_GRAD_NORM is not None:  # the norm before clipping: above MAX_GRAD_NORM, it was clipped
                grad_norm = acc.clip_grad_norm_(params, cfg.MAX_GRAD_NORM)
            run.optimizer.step()
            lr = run.lr_scheduler.get_last_lr()[0]  # the rate this step used
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            window += torch.stack([step_loss, grad_norm.float(), torch.ones((), device=acc.device)])
            progress.update(1)

            # --- logging: one device->host read every LOG_EVERY steps
            log_now = step % cfg.LOG_EVERY == 0 or step == run.max_steps
            if log_now:
                loss_mean, norm_mean = (acc.reduce(window[:2] / window[2], "mean")).tolist()
                record = {"step": step, "loss": loss_mean, "lr": lr, "epoch": epoch}
                metrics.write(record | ({"grad_norm": norm_mean} if cfg.MAX_GRAD_NORM is not None else {}))
                progress.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{lr:.2e}")
                window.zero_()
                if not math.isfinite(loss_mean):
                    raise UserError(f"training diverged: the loss became {loss_mean} by step {step} — "
                                    "lower LEARNING_RATE, use bf16 rather than fp16 (or --VAE_FP32=True), or "
                                    "MIXED_PRECISION=no; no weights were written, earlier checkpoints kept")

            # --- the held-out pictures' loss (VALIDATION_SPLIT)
            if run.validation and (step % cfg.VALIDATION_LOSS_STEPS == 0 or step == run.max_steps):
                log_validation_loss(run, metrics, step)

            # --- validation pictures
            if cfg.VALIDATION_STEPS and step % cfg.VALIDATION_STEPS == 0 and step < run.max_steps:
                if acc.is_main_process:
                    progress.write(f"validation images: {log_validation(run, step)}")

            # --- checkpoint, and stop when asked to (Ctrl-C, SIGTERM)
            periodic = bool(cfg.CHECKPOINTING_STEPS) and step % cfg.CHECKPOINTING_STEPS == 0
            stopping = stop.agreed(acc, sync_now=log_now or periodic)
            if (periodic or stopping) and step < run.max_steps:
                path = save_checkpoint(run, step)
                if path:
                    progress.write(f"checkpoint: {path}")
                if stopping:
                    progress.close()
                    resume = os.path.join(cfg.OUTPUT_DIR, f"checkpoint-{step}")
                    print0(f"stopped at step {step}; resume with:\n  {resume_command(run.command, resume)}")
                    sys.exit(130 if stop.signum == signal.SIGINT else 143)
    finally:
        stop.restore()
        progress.close()  # before any error message, so it starts on a line of its own
    free_memory()  # the steps' activations back to the OS: the next phase's peak starts from the models
    print0(f"trained {run.max_steps - start_step} steps in {time.time() - t0:.1f}s; "
           f"{peak_memory_text(acc, 'training')}")
    return run.max_steps


# =============================================================================
# 7. Save the adapter, then check that the file is the model we trained
# =============================================================================
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def save_lora(path, models, cfg, dtype=None):
    """Write the diffusers-format LoRA file atomically; refuse NaN/inf weights."""
    tensors = lora_state_dict(models, dtype or SAVE_DTYPES[cfg.SAVE_DTYPE])
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:  # never replace good weights with broken ones
        raise UserError(f"training diverged: {len(bad)} LoRA tensors hold NaN/inf (e.g. {bad[0]}), so {path} "
                        "was not written — lower LEARNING_RATE, use bf16 or MIXED_PRECISION=no, or "
                        "--VAE_FP32=True; earlier files are kept")
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=lora_metadata(models, cfg))
    return sum(v.numel() for v in tensors.values())


def fixed_unet_input(unet, vae_scale, resolution, device, seed=1234):
    """One fixed (z_t, t, conditioning) for the UNet, random but seeded, shaped as the UNet's config
    wants: SDXL's also takes a pooled embedding and the six size/crop ids."""
    g = torch.Generator().manual_seed(seed)
    h = resolution // vae_scale
    z = torch.randn(1, unet.config.in_channels, h, h, generator=g)
    cond = {"encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g).to(device),
                                     "time_ids": time_ids.to(device)}
    cond["encoder_hidden_states"] = cond["encoder_hidden_states"].to(device)
    return z.to(device), torch.tensor([500], device=device), cond  # fp32: autocast casts them


@torch.no_grad()
def check_saved_lora(unet, path, cfg, vae_scale, autocast):
    """Reload the file the way diffusers does (load_lora_adapter reads the alpha metadata) into the
    same frozen base, and compare with the trained adapter on one fixed input."""
    z, t, cond = fixed_unet_input(unet, vae_scale, cfg.RESOLUTION, unet.device)
    unet.eval()  # no LoRA dropout in the comparison
    with autocast():
        y_trained = unet(z, t, **cond, return_dict=False)[0].float()
        unet.disable_adapters()
        y_base = unet(z, t, **cond, return_dict=False)[0].float()
        unet.enable_adapters()
        # folder + weight_name: diffusers reads the alpha metadata only on its safetensors path
        with warnings.catch_warnings():  # PEFT warns that this adds a second adapter: here that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            unet.load_lora_adapter(os.path.dirname(path), weight_name=os.path.basename(path), prefix="unet",
                                   adapter_name="reloaded")
        unet.set_adapter("reloaded")
        unet.eval()  # the new adapter's dropout modules were created in training mode
        y_reloaded = unet(z, t, **cond, return_dict=False)[0].float()
    unet.set_adapter("default")
    unet.delete_adapters("reloaded")
    diff = (y_reloaded - y_trained).abs().max().item()
    effect = (y_trained - y_base).abs().max().item()
    compute_eps = 1e-5 if frozen_dtype(unet) == torch.float32 else 1e-2  # rounding of the forward pass itself
    save_eps = 1e-2 if cfg.SAVE_DTYPE == "fp16" else 0.0  # fp16 files round A and B (a wrong α: ~100% off)
    tolerance = compute_eps * max(1.0, y_trained.abs().max().item()) + save_eps * effect
    if diff > tolerance:
        raise RuntimeError(f"the saved LoRA does not reproduce the trained model (max difference {diff:.3g}"
                           f" > {tolerance:.3g})")
    print0(f"reload check: saved file vs trained model, max |Δoutput| = {diff:.2e} "
           f"(LoRA's own effect {effect:.2e})")


def save_webui_file(cfg, family, models, steps, num_images, t_start):
    """OUTPUT_DIR/<OUTPUT_NAME>.safetensors with kohya-style keys (lora_unet_..., lora_te_... or SDXL's
    lora_te1_/lora_te2_, .lora_down/.lora_up/.alpha): the format Stable Diffusion WebUI and ComfyUI read."""
    if cfg.USE_DORA:
        print0("note: USE_DORA=True — no WebUI/ComfyUI file written (their DoRA key conventions differ); "
               "use the diffusers file")
        return None
    state_dicts = {name: {k: v for k, v in get_peft_model_state_dict(m).items() if "lora_" in k}
                   for name, m in models.items()}
    state_dicts = {name: sd for name, sd in state_dicts.items() if sd}  # (only embedding rows trained there)
    info = dict(cfg.as_dict(), steps=steps, num_images=num_images, started_at=t_start,
                finished_at=time.time())
    path = os.path.join(cfg.OUTPUT_DIR, f"{cfg.OUTPUT_NAME}.safetensors")
    # kohya files always mean an α/r scale; with rsLoRA (α/√r) the file carries α' = α·√r
    save_kohya_file(path, state_dicts, {name: cfg.LORA_ALPHA for name in state_dicts}, dict(family.webui),
                    kohya_metadata(info, family.webui_metadata), SAVE_DTYPES[cfg.SAVE_DTYPE],
                    use_rslora=cfg.USE_RSLORA)
    return path


def save_and_check(run, num_images, t_start):
    """The adapter files, the config, the reload check, and the pictures of the run itself."""
    cfg, models = run.cfg, run.models()
    weights_path = os.path.join(cfg.OUTPUT_DIR, WEIGHTS_NAME)
    n = save_lora(weights_path, models, cfg)
    kohya_path = save_webui_file(cfg, run.sd.family, models, run.max_steps, num_images, t_start)
    atomic_write_text(os.path.join(cfg.OUTPUT_DIR, "training_config.json"), cfg.to_json() + "\n")
    print0(f"saved {n:,} LoRA parameters to {weights_path} ({os.path.getsize(weights_path) / 1e6:.2f} MB, "
           f"{cfg.SAVE_DTYPE})" + (f" and {kohya_path} (WebUI/ComfyUI keys)" if kohya_path else ""))
    check_saved_lora(models["unet"], weights_path, cfg, run.sd.vae_scale, run.accelerator.autocast)
    # a look inside the adapter: how many directions each learned update ΔW = (α/r)·B·A really uses
    if cfg.USE_DORA:
        print0("note: USE_DORA=True — no rank spectrum (a DoRA update also rescales W0's columns)")
    else:
        rows, text = spectrum_table(lora_updates(models["unet"]))
        print0(text)
        save_spectrum_plot(rows, os.path.join(cfg.OUTPUT_DIR, "rank_spectrum.png"))
    records = read_metrics(os.path.join(cfg.OUTPUT_DIR, "metrics.jsonl"))
    if records:
        save_loss_curve(records, os.path.join(cfg.OUTPUT_DIR, "loss_curve.png"))
    held_out = [(r["val_loss"], r["step"]) for r in records if "val_loss" in r]
    if held_out:  # which weights generalise best, by this measure (a low loss is not yet a good picture)
        loss, step = min(held_out)
        folder = os.path.join(cfg.OUTPUT_DIR, f"checkpoint-{step}")
        where = (folder if os.path.isdir(folder) else "the final weights" if step == run.max_steps
                 else "no checkpoint")
        print0(f"lowest validation loss: {loss:.4f} at step {step} ({where}); "
               f"at the end: {held_out[-1][0]:.4f}")


# =============================================================================
# 8. Load base + LoRA as any user would, and generate
# =============================================================================
def load_pipeline_with_lora(cfg, family, weights_dir, dtype, weight_name=WEIGHTS_NAME):
    """load_pipeline + load_lora_weights: plain diffusers, nothing of ours."""
    pipe = load_pipeline(cfg, family, dtype)
    # diffusers logs "No LoRA keys associated to CLIPTextModel" for a UNet-only file, the usual kind: drop it
    no_text_encoder_notice = lambda rec: "No LoRA keys associated to" not in rec.getMessage()  # noqa: E731
    logger = logging.getLogger("diffusers.loaders.lora_base")
    logger.addFilter(no_text_encoder_notice)
    try:
        pipe.load_lora_weights(weights_dir, weight_name=weight_name)
    finally:
        logger.removeFilter(no_text_encoder_notice)
    return pipe


def reproduce_recipe(cfg, family, dtype, device, extra_lines=()):
    """The plain-diffusers lines that render test_generation.png again: same dtype, device and seed."""
    fp32_vae = vae_dtype(cfg, dtype) != dtype  # the VAE in fp32 under a half-precision UNet
    cls = family.pipeline
    kwargs = "".join(f", {k}={v!r}" for k, v in family.pipeline_kwargs if k == "safety_checker")
    vae = ""
    if fp32_vae:
        vae = f", vae=AutoencoderKL.from_pretrained({cfg.MODEL_ID!r}, subfolder='vae', dtype=torch.float32)"
    lines = [f"import torch; from diffusers import {'AutoencoderKL, ' if fp32_vae else ''}{cls}",
             f"pipe = {cls}.from_pretrained({cfg.MODEL_ID!r}, dtype={dtype}{vae}{kwargs})"
             f".to({str(device)!r})",
             f"pipe.load_lora_weights({cfg.OUTPUT_DIR!r})", *extra_lines]
    call = (f"pipe({cfg.VALIDATION_PROMPTS[0]!r}, height={cfg.RESOLUTION}, width={cfg.RESOLUTION}, "
            f"num_inference_steps={cfg.NUM_INFERENCE_STEPS}, guidance_scale={cfg.GUIDANCE_SCALE}, "
            f"generator=torch.Generator().manual_seed({cfg.SEED})")
    if fp32_vae:  # VAE_FP32: decode the latents in fp32
        lines += [f"latents = {call}, output_type='latent').images",
                  "with torch.no_grad(): image = pipe.image_processor.postprocess("
                  "pipe.vae.decode(latents.float() / pipe.vae.config.scaling_factor).sample)[0]"]
    else:
        lines.append(f"image = {call}).images[0]")
    return "\n".join("  " + line for line in lines)


def merge_and_save(pipe, folder, dtype):
    """SAVE_MERGED_MODEL: W = W0 + (α/r)·B·A written into the base weights (Hu et al. 2021, Sec. 4.1:
    no extra inference latency), saved as a full pipeline folder that needs no LoRA loading. `pipe`: base +
    LoRA in fp32 (in bf16 an update smaller than 1/256 of a weight would round away); saved in `dtype`."""
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()  # the fused weights stay; only the adapter modules go
    for part in pipe.components.values():  # (nn.Module.to: diffusers' own .to warns about an empty list)
        if isinstance(part, torch.nn.Module):
            torch.nn.Module.to(part, dtype)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(folder)), prefix=".merged-")
    try:
        pipe.save_pretrained(tmp)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate(cfg, pipe, prompts, recipe, notes=None):
    """test_generation.png (the first validation prompt) and comparison.png (`prompts` without and with
    the LoRA, at one seed, and `notes` under each row) from `pipe`, base + LoRA loaded by plain
    diffusers; recipe: the lines that reproduce the test image."""
    image_path = os.path.join(cfg.OUTPUT_DIR, "test_generation.png")
    save_png(render(pipe, cfg, cfg.VALIDATION_PROMPTS[:1], [cfg.SEED])[0], image_path)
    print0(f"test image: {image_path} — reproduce it with plain diffusers:\n{recipe}")
    # comparison.png: the same prompts and seed without (top) and with (bottom) the LoRA
    pipe.disable_lora()
    base = render(pipe, cfg, prompts, [cfg.SEED])
    pipe.enable_lora()
    tuned = render(pipe, cfg, prompts, [cfg.SEED])
    rows = {"base model": base, "base + LoRA": tuned}
    save_png(comparison_image(rows, prompts, notes), os.path.join(cfg.OUTPUT_DIR, "comparison.png"))


# =============================================================================
# The run: sections 1-8 in order
# =============================================================================
def main(argv):
    # --- 1. configuration, checked before anything slow -----------------------------
    cfg, accelerator, weight_dtype, family = start(resolve_config(argv))
    resume_path = resume_point(cfg, accelerator)  # None: a new run, in a folder of its own

    # --- 2. data: listed and decoded once, so a bad folder fails before any download -----
    images, captions = load_captioned_images(cfg, show_progress=accelerator.is_local_main_process)
    (images, captions), held_out = split_validation(images, captions, cfg)  # VALIDATION_SPLIT
    sizes = bucket_sizes(images, cfg) if cfg.ASPECT_RATIO_BUCKETING else None  # each picture's (h, w) bucket

    # --- 3. load and freeze -----------------------------------------------------------
    set_seed(cfg.SEED)  # the same on every process, so every process starts from the same LoRA
    sd = load_models(cfg, family, weight_dtype)
    freeze(sd.unet, sd.vae, *sd.text_encoders)
    base_params = count_params(sd.unet)
    for m in (sd.unet, sd.vae, *sd.text_encoders):
        m.to(accelerator.device)

    # --- 4. add LoRA ------------------------------------------------------------------
    trainable = add_lora(sd.unet, cfg, cfg.TARGET_MODULES)
    if cfg.TRAIN_TEXT_ENCODER:
        for te in sd.text_encoders:
            trainable += add_lora(te, cfg, cfg.TEXT_ENCODER_TARGET_MODULES, "TEXT_ENCODER_TARGET_MODULES")
    describe_lora(cfg, trainable, base_params)
    if cfg.GRADIENT_CHECKPOINTING:
        sd.unet.enable_gradient_checkpointing()

    # --- 5. encode the data once --------------------------------------------------------
    empty_ids = tokenize(sd.tokenizers, [""])[0]  # the empty caption (CAPTION_DROPOUT)
    dataset = CaptionedImages(images, tokenize(sd.tokenizers, captions), cfg, empty_ids, sizes)
    validation = validation_data(*held_out, sd, cfg)  # the held-out pictures, or None
    if cfg.CACHE_LATENTS:
        dataset = cache_latents(dataset, sd, cfg, show_progress=accelerator.is_local_main_process)
        sd.vae = None  # done with the frozen encoders: free their memory for the UNet
        if not text_encoder_trains(sd) and not cfg.SHUFFLE_CAPTION_TAGS:
            sd.text_encoders = tuple(None for _ in sd.text_encoders)
        free_memory()
        print0(peak_memory_text(accelerator, "loading and caching"))
    if cfg.SHUFFLE_CAPTION_TAGS:  # tags in a new order every time: the prompt is encoded at every step
        dataset = ShuffledTags(dataset, captions, sd.tokenizers, cfg.KEEP_TAGS)

    # --- 6. train -------------------------------------------------------------------------
    models = [(sd.unet, cfg.LEARNING_RATE)]
    if cfg.TRAIN_TEXT_ENCODER:
        models += [(te, cfg.TEXT_ENCODER_LEARNING_RATE or cfg.LEARNING_RATE) for te in sd.text_encoders]
    command = (os.path.basename(__file__), *argv)
    run = prepare_run(cfg, accelerator, sd, dataset, lora_param_groups(models, cfg), command)
    run.validation = validation
    describe_run(run, f"{len(images)} images")
    start_step, resume_rng = 0, None
    if resume_path is not None:
        start_step, resume_rng = restore_checkpoint(run, resume_path)
        print0(f"resumed from {resume_path} at step {start_step}")
    # from here each process draws its own dropout masks (the noise is each example's own: EpochShuffle)
    set_seed(cfg.SEED, device_specific=True)
    t_start = time.time()
    train(run, start_step, resume_rng)

    # --- 7. save and check ------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_and_check(run, len(images), t_start)

    # --- 8. load base + LoRA as a user would, and generate -----------------------------------
    # drop the trained models first (accelerate holds references too): one UNet in memory, not two
    del run, sd, dataset, models, trainable
    accelerator.free_memory()
    free_memory()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        pipe = load_pipeline_with_lora(cfg, family, cfg.OUTPUT_DIR, weight_dtype).to(accelerator.device)
        notes = None
        if cfg.DEMO:  # the demo's world can be judged by a program: how often is purple drawn?
            from lora_tools.shapes import concept_report  # the demo's judge (numpy pixel arithmetic)

            notes = concept_report(pipe, seeds=[0, 1, 2, 3], steps=cfg.NUM_INFERENCE_STEPS, log=print0,
                                   guidance_scale=cfg.GUIDANCE_SCALE,
                                   path=os.path.join(cfg.OUTPUT_DIR, "concept_scores.json"))
        recipe = reproduce_recipe(cfg, family, weight_dtype, accelerator.device)
        generate(cfg, pipe, cfg.VALIDATION_PROMPTS, recipe, notes)
        del pipe
        if cfg.SAVE_MERGED_MODEL:
            folder = os.path.join(cfg.OUTPUT_DIR, "merged_pipeline")
            merge_and_save(load_pipeline_with_lora(cfg, family, cfg.OUTPUT_DIR, torch.float32), folder,
                           SAVE_DTYPES[cfg.SAVE_DTYPE])
            print0(f"merged pipeline (LoRA fused into the weights, {cfg.SAVE_DTYPE}): {folder}")
        print0(f"{peak_memory_text(accelerator, 'saving and rendering')}; "
               f"whole run: {max(PHASE_PEAKS.values()) / 2**30:.2f} GB")
    accelerator.end_training()


OOM_HELP = ("out of GPU memory — lower BATCH_SIZE (and raise GRADIENT_ACCUMULATION_STEPS to keep the "
            "effective batch), set --GRADIENT_CHECKPOINTING=True, lower RESOLUTION, keep CACHE_LATENTS=True, "
            "or use --MIXED_PRECISION=bf16/fp16 (8-bit Adam does not help: a LoRA's whole optimizer state is "
            "a few MB); checkpoints already written are kept")


def run_from_command_line(main, doc, keys, defaults):
    """`python <script> --NAME=value ...`: --help, or main(argv) with our errors as one line each."""
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(doc)
        print("settings (defaults):")
        for k in keys:
            print(f"  --{k}={defaults[k]!r}")
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


if __name__ == "__main__":
    run_from_command_line(main, __doc__, CONFIG_KEYS, globals())
