"""
LoRA fine-tuning of Stable Diffusion, end to end, in one readable file.

It loads Stable Diffusion, freezes all of it, adds small trainable low-rank matrices (LoRA) to the
UNet's attention projections, trains them with the denoising objective, saves them as one small
safetensors file that diffusers loads, and renders a test image from base model + LoRA.

Usage (every constant below can be overridden as --NAME=value, spelled exactly like the constant):

    # offline demo on a CPU, ~2 minutes: LoRA teaches a small pretrained model a colour it never saw
    python lora_complete_example.py --DEMO=True

    # the real run: downloads SD1.5 and the Naruto captions dataset, trains on the visible GPU
    python lora_complete_example.py

    # pick the GPU, your own images (a folder with metadata.jsonl or .txt captions), other knobs
    CUDA_VISIBLE_DEVICES=1 python lora_complete_example.py --DATA_DIR=./my_images --LORA_RANK=8

    # one subject from a few pictures: DreamBooth with prior preservation, and a new token learned with the LoRA
    python lora_complete_example.py --DATA_DIR=./my_dog --INSTANCE_PROMPT="a photo of <zwx> dog" --CLASS_PROMPT="a photo of a dog" --NEW_TOKEN="<zwx>"

    # several GPUs, data-parallel
    accelerate launch --multi_gpu --num_processes 2 lora_complete_example.py

Writes to OUTPUT_DIR: pytorch_lora_weights.safetensors (the adapter in diffusers' format, with its
rank/alpha metadata), <OUTPUT_NAME>.safetensors (the same adapter for Stable Diffusion WebUI and
ComfyUI), training_config.json, test_generation.png, comparison.png (without/with the LoRA),
metrics.jsonl + loss_curve.png, rank_spectrum.png, and checkpoint-<step>/ folders to resume from;
with NEW_TOKEN also <OUTPUT_NAME>_emb.safetensors (the token's embedding, for load_textual_inversion),
with CLASS_PROMPT the class pictures in class_images/.
The numbered sections follow diffusion_lora_finetuning_tutorial.md chapter 4.
"""
import json
import math
import os
import sys
import time
import warnings

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
LORA_DROPOUT = 0.0  # dropout on the LoRA branch's input; 0.05-0.1 against overfitting on few images (rule of thumb)
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]  # UNet attention projections that get adapters
USE_DORA = False  # DoRA (Liu et al. 2024): also learn each output feature's magnitude; a little slower per step
USE_RSLORA = False  # rsLoRA (Kalajdzievski 2023): scale by α/√r instead of α/r, so high ranks keep learning
TRAIN_TEXT_ENCODER = False  # also put LoRA on the CLIP text encoder (prompts can't then be cached)
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP attention projections
# dreambooth: one subject from a few pictures (Ruiz et al. 2023), and pivotal tuning (a new token learned with the LoRA)
INSTANCE_PROMPT = None  # e.g. "a photo of <zwx> dog": every training image trains with this prompt (captions not needed); None = captions
CLASS_PROMPT = None  # e.g. "a photo of a dog": prior preservation on the base model's own pictures of the class; None = off
CLASS_DATA_DIR = None  # the class pictures: reused if there, drawn by the base model if missing; None = OUTPUT_DIR/class_images
NUM_CLASS_IMAGES = 100  # class pictures, each drawn once (Ruiz et al. 2023: ~1000, "but less can be used"; diffusers' README: 200-300)
PRIOR_LOSS_WEIGHT = 1.0  # λ in loss = subject loss + λ·class loss (Ruiz et al. Eq. 2 use λ = 1)
NEW_TOKEN = None  # e.g. "<zwx>": add this token to the tokenizer and learn its embedding with the LoRA (pivotal tuning); None = off
NUM_NEW_TOKEN_VECTORS = 2  # embedding vectors the new token stands for (diffusers names them <zwx>, <zwx>_1, ...)
NEW_TOKEN_INIT_WORD = None  # the new vectors start as this word's embedding (textual inversion starts from a coarse descriptor, e.g. "dog"); None = "object"
EMBEDDING_LEARNING_RATE = 5e-4  # AdamW step size for the new token's vectors (Gal et al. 2023 train one alone at 0.005 x GPUs x batch; the LoRA learns too here)
# optimisation
LEARNING_RATE = 1e-4  # AdamW step size for the LoRA weights (the HF LoRA blog: 1e-4, vs ~1e-6 for full fine-tuning)
TEXT_ENCODER_LEARNING_RATE = None  # for the text encoder's LoRA; None = LEARNING_RATE
LORAPLUS_LR_RATIO = None  # LoRA+ (Hayou et al. 2024): B matrices learn at LEARNING_RATE x this (> 1); None = off
SNR_GAMMA = None  # Min-SNR-γ loss weighting (Hang et al. 2023); 5.0 is the paper's default; None = plain MSE
NOISE_OFFSET = 0.0  # offset noise (Guttenberg 2023): adds this x N(0,1) per image and channel; 0.05-0.1 is a common choice
BATCH_SIZE = 1  # images per GPU per forward pass
GRADIENT_ACCUMULATION_STEPS = 4  # forward passes per optimizer step; effective batch = BATCH_SIZE x this x GPUs
NUM_EPOCHS = 10  # passes over the data (ignored when MAX_TRAIN_STEPS is set)
MAX_TRAIN_STEPS = None  # optimizer steps in total; None = NUM_EPOCHS worth; when set it wins
LR_SCHEDULER = "constant"  # constant | constant_with_warmup | linear | cosine | cosine_with_restarts | polynomial
LR_WARMUP_STEPS = 0  # optimizer steps of linear warm-up from 0 to LEARNING_RATE
MAX_GRAD_NORM = 1.0  # clip the LoRA gradients' global L2 norm to this; None = no clipping
ADAM_WEIGHT_DECAY = 1e-2  # AdamW decoupled weight decay
MIXED_PRECISION = "auto"  # auto | no | fp16 | bf16; auto = bf16 on GPUs with bf16 tensor cores, else fp16; fp32 on a CPU
ALLOW_TF32 = True  # TF32 tensor cores for fp32 matmuls on Ampere+ GPUs (faster; 10-bit mantissa instead of 23)
VAE_FP32 = False  # keep the VAE in fp32 under fp16 (the SD VAE can overflow to NaN in fp16), also when rendering
GRADIENT_CHECKPOINTING = False  # recompute UNet activations in backward: less memory, more compute (see benchmarks/)
USE_8BIT_ADAM = False  # bitsandbytes 8-bit AdamW: saves 3/4 of a LoRA's few-MB optimizer state, not an OOM fix (GPU only)
COMPILE = False  # torch.compile the UNet (slow first step, faster after)
SEED = 42  # seeds data order, noise, timesteps, LoRA init and the test image
LOG_EVERY = 10  # log the mean loss every N optimizer steps (reading it from the GPU is a sync)
# checkpoints
CHECKPOINTING_STEPS = 500  # save a resumable OUTPUT_DIR/checkpoint-<step>/ every N optimizer steps; None = never
CHECKPOINTS_TOTAL_LIMIT = None  # keep only the newest N checkpoints; None = keep all
RESUME_FROM = None  # "latest" (newest checkpoint in OUTPUT_DIR) or a checkpoint-<step> folder; None = fresh start
# output
OUTPUT_DIR = "my_lora_model"  # where the adapter, config and pictures go
OUTPUT_NAME = "my_lora"  # the WebUI/ComfyUI copy is OUTPUT_DIR/<OUTPUT_NAME>.safetensors
SAVE_DTYPE = "fp32"  # fp32 | fp16: precision of the saved LoRA files (fp16 halves their size) and of a merged model
SAVE_MERGED_MODEL = False  # also save base + LoRA fused (W = W0 + (α/r)·B·A) as a full pipeline in OUTPUT_DIR/merged_pipeline
VALIDATION_PROMPTS = ["a man with blue eyes, in the style of naruto", "a girl with pink hair, in the style of naruto"]  # the first is test_generation.png; all go in comparison.png
NUM_VALIDATION_SEEDS = 2  # images per prompt in the validation grids (seeds SEED, SEED+1, ...)
VALIDATION_STEPS = None  # render a grid into OUTPUT_DIR/validation/ every N steps; None = only at the end
REPORT_TO = None  # "tensorboard": also log loss and lr through accelerate's trackers (pip install tensorboard)
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


def print0(*args, **kwargs):
    """print on the main process only (accelerate sets RANK in each process it launches)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def resolve_config(argv):
    """Defaults from the block above + DEMO values + --NAME=value overrides -> a frozen, checked Config."""
    from lora_tools.checks import check_config

    values = parse_overrides(argv, {k: globals()[k] for k in CONFIG_KEYS}, log=print0)
    if values["DEMO"]:
        given = {a[2:].split("=", 1)[0] for a in argv}
        values.update({k: v for k, v in DEMO_SETTINGS.items() if k not in given})
    check_config(values)
    return Config(values)


def resolve_mixed_precision(requested, cuda):
    """'auto' -> what this machine does well; refuse what it cannot do at all."""
    if not cuda:
        if requested == "fp16":
            raise UserError("MIXED_PRECISION='fp16' needs a CUDA GPU and none is visible — use --MIXED_PRECISION=no (or bf16) on a CPU")
        return "no" if requested == "auto" else requested
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(f"MIXED_PRECISION='bf16' is not supported by {torch.cuda.get_device_name()} — use --MIXED_PRECISION=fp16")
    if requested == "auto":  # bf16 tensor cores came with Ampere; T4 and V100 only emulate bf16, slowly
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return requested


DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def start(cfg):
    """Everything the run needs before its first slow step: the Accelerator (one per process under
    `accelerate launch`), the dtype of the frozen weights, the demo's assets, and every check."""
    from accelerate import Accelerator, DataLoaderConfiguration

    from lora_tools.checks import check_environment, check_output_dir, check_paths

    check_environment(cfg)
    cuda = torch.cuda.is_available()
    mixed_precision = resolve_mixed_precision(cfg.MIXED_PRECISION, cuda)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not cuda,
                              gradient_accumulation_steps=cfg.GRADIENT_ACCUMULATION_STEPS,
                              dataloader_config=DataLoaderConfiguration(non_blocking=cuda),  # async copies from pinned memory
                              log_with=cfg.REPORT_TO, project_dir=os.path.join(cfg.OUTPUT_DIR, "logs"))
    if cuda and cfg.ALLOW_TF32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not cuda:
        from lora_tools.machine import keep_host_memory

        keep_host_memory()  # glibc: reuse freed host memory instead of returning it to the OS every step
        print0("no CUDA GPU visible: training on the CPU in fp32 — fine for --DEMO=True, far too slow for SD1.5")
    if cfg.DEMO:
        from lora_tools.checks import check_demo_base
        from lora_tools.shapes import build_concept_dataset

        check_demo_base(DEMO_SETTINGS["MODEL_ID"])
        with accelerator.main_process_first():  # drawn once, then every process reads it
            build_concept_dataset(DEMO_SETTINGS["DATA_DIR"])
        print0("DEMO: teaching the pretrained shapes model (demo_base/) the colour purple, which it has never seen")
    check_paths(cfg)
    if accelerator.is_main_process:
        check_output_dir(cfg.OUTPUT_DIR)
    print0(f"mixed precision: {mixed_precision} (frozen weights in {DTYPES[mixed_precision]}, LoRA weights in fp32)")
    return accelerator, DTYPES[mixed_precision]


# =============================================================================
# 2. Data: read and check the captioned images
# =============================================================================
def load_captioned_images(cfg, show_progress=True):
    """(images, captions): images is a list of file paths or PIL images, captions a list of str.
    Every image is decoded once here, so a broken file is skipped now, not hours into training."""
    from tqdm.auto import tqdm

    from lora_tools.checks import explain_load_error
    from lora_tools.data import CAPTION_COLUMN_GUESSES, IMAGE_COLUMN_GUESSES, HubImages, open_image, pick_column, read_folder

    if cfg.DATA_DIR is not None:
        records = read_folder(cfg.DATA_DIR, cfg.CAPTION_COLUMN, log=print0, captions_needed=cfg.INSTANCE_PROMPT is None)
        images, captions = [r[0] for r in records], [r[1] for r in records]
    else:
        from datasets import load_dataset

        try:
            ds = load_dataset(cfg.DATASET_NAME, split="train")
        except (OSError, ConnectionError) as e:
            raise UserError(explain_load_error("DATASET_NAME", cfg.DATASET_NAME, e)) from None
        image_col = pick_column(ds.column_names, cfg.IMAGE_COLUMN, IMAGE_COLUMN_GUESSES, "images", "IMAGE_COLUMN")
        if cfg.INSTANCE_PROMPT is None:
            caption_col = pick_column(ds.column_names, cfg.CAPTION_COLUMN, CAPTION_COLUMN_GUESSES, "captions", "CAPTION_COLUMN")
        images = HubImages(ds, image_col)
        captions = [str(c or "") for c in ds[caption_col]] if cfg.INSTANCE_PROMPT is None else [""] * len(ds)
    n = len(captions) if cfg.MAX_TRAIN_SAMPLES is None else min(cfg.MAX_TRAIN_SAMPLES, len(captions))
    kept, skipped = [], []
    for i in tqdm(range(n), desc="checking images", disable=not show_progress):
        try:
            img = images[i]
            open_image(img) if isinstance(img, str) else img.load()
            kept.append(i)
        except Exception as e:  # truncated, corrupt, or not an image at all: skip it, say which
            name = images[i] if isinstance(images, list) else f"row {i} of {cfg.DATASET_NAME}"
            skipped.append(f"{name} ({type(e).__name__})")
    where = cfg.DATA_DIR or cfg.DATASET_NAME
    if not kept:
        raise UserError(f"none of the {n} images in {where!r} could be read ({', '.join(skipped[:3])}) — check the files")
    if skipped:
        print0(f"skipped {len(skipped)} unreadable image(s) of {n}: {', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}; "
               f"training on {len(kept)}")
    return [images[i] for i in kept], [captions[i] for i in kept]


def subject_captions(cfg, captions):
    """DreamBooth (Ruiz et al. 2023, Sec. 3.2): every picture of the subject is "a [identifier] [class noun]",
    INSTANCE_PROMPT, whatever its caption. With NEW_TOKEN the captions must name the token, or it never trains."""
    if cfg.INSTANCE_PROMPT is not None:
        return [cfg.INSTANCE_PROMPT] * len(captions)
    if cfg.NEW_TOKEN is not None and not any(cfg.NEW_TOKEN in c for c in captions):
        raise UserError(f"NEW_TOKEN {cfg.NEW_TOKEN!r} appears in no caption, so it would never be trained — "
                        f"write it into the captions, or set --INSTANCE_PROMPT='a photo of {cfg.NEW_TOKEN} dog'")
    return captions


def class_image_paths(cfg, accelerator, dtype):
    """Prior preservation (Ruiz et al. 2023, Sec. 3.3): NUM_CLASS_IMAGES pictures of CLASS_PROMPT drawn by
    the frozen base model itself, once (image i from seed SEED + i); a rerun, or your own folder, reuses them."""
    from lora_tools.dreambooth import class_images

    folder = cfg.CLASS_DATA_DIR or os.path.join(cfg.OUTPUT_DIR, "class_images")
    make_pipeline = lambda: load_pipeline(cfg, dtype).to(accelerator.device)  # noqa: E731  (loaded only if some are missing)
    draw = lambda pipe, seed: render(pipe, cfg, [cfg.CLASS_PROMPT], [seed])[0]  # noqa: E731
    with accelerator.main_process_first():  # drawn once, by the main process; the others then find them there
        return class_images(folder, cfg.NUM_CLASS_IMAGES, make_pipeline, draw, cfg.CLASS_PROMPT, cfg.SEED,
                            show_progress=accelerator.is_local_main_process, log=print0)


# =============================================================================
# 3. Load Stable Diffusion and freeze it
# =============================================================================
def load_models(cfg, weight_dtype, vae_dtype):
    """The five parts of Stable Diffusion (Rombach et al. 2022, LDM Sec. 3): tokenizer + CLIP text
    encoder τθ(y), VAE encoder/decoder E/D (x -> z, 8x smaller), UNet εθ(z_t, t, τθ(y)), noise schedule."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from lora_tools.checks import explain_load_error

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
def lora_config_from(cfg, target_modules, token_ids=None):
    """token_ids (pivotal tuning, text encoder only): these rows of the token embedding train too."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.LORA_RANK, lora_alpha=cfg.LORA_ALPHA, lora_dropout=cfg.LORA_DROPOUT,
                      init_lora_weights="gaussian", target_modules=list(target_modules),
                      use_dora=cfg.USE_DORA, use_rslora=cfg.USE_RSLORA,
                      trainable_token_indices={"token_embedding": token_ids} if token_ids else None)


def check_target_modules(model, targets, setting):
    """Each name must match a Linear layer of the model, or PEFT would train nothing there."""
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:  # name the projections inside its attention modules: "to_q", "to_out.0", "q_proj", ...
        attention = sorted({".".join(n.split(".")[max(i for i, p in enumerate(n.split(".")) if "attn" in p) + 1:])
                            for n in linear if "attn" in n})
        if not attention:  # demo_base/'s text encoder has no transformer layers (lora_tools/demo_base.py says why)
            raise UserError(f"{setting} {missing}: the {type(model).__name__} has no attention layers to adapt — train without it")
        raise UserError(f"{setting} {missing} match no layer of the {type(model).__name__}; its attention projections "
                        f"are {attention} — e.g. --{setting}={','.join(attention)}")


def add_lora(model, cfg, target_modules, setting="TARGET_MODULES", token_ids=None):
    """Wrap each target Linear of `model` (the UNet or the CLIP text encoder) with a LoRA branch.
    Returns the new trainable tensors, in fp32 whatever dtype the frozen weights have."""
    from diffusers.training_utils import cast_training_params
    from peft import inject_adapter_in_model

    check_target_modules(model, target_modules, setting)
    config = lora_config_from(cfg, target_modules, token_ids)
    if hasattr(model, "load_lora_adapter"):  # diffusers' models: add_adapter also registers the adapter by name
        model.add_adapter(config)
    else:  # transformers' add_adapter wants PEFT >= 0.22; PEFT's own injection does the same thing
        inject_adapter_in_model(config, model, adapter_name="default")
    # fp32 master weights: bf16 has 8 bits of mantissa, too few for small updates
    cast_training_params(model, dtype=torch.float32)
    return [p for n, p in model.named_parameters() if p.requires_grad and "trainable_tokens" not in n]  # (not NEW_TOKEN's rows)


# --- pivotal tuning: a new token, its embedding learned together with the LoRA ---------------------
# Textual inversion (Gal et al. 2023, Eq. 2) learns a new word's embedding v* with the model frozen;
# pivotal tuning (named after Roich et al. 2021; for SD LoRAs cloneofsimo/lora, Dec 2022) learns it
# together with the LoRA. The token gets NUM_NEW_TOKEN_VECTORS rows of the embedding table; PEFT's
# trainable tokens train those rows only (a small (n, d) tensor swapped in at lookup), so every other
# row stays bit-identical and no 49408 x 768 gradient is ever made.
def add_new_token(tokenizer, text_encoder, cfg):
    """NEW_TOKEN -> n new tokenizer entries <t>, <t>_1, ... (diffusers' names), their embedding rows set
    to NEW_TOKEN_INIT_WORD's embedding. Unless TRAIN_TEXT_ENCODER (then add_lora makes them trainable
    with its LoRA), PEFT's trainable tokens are put on those rows now. Returns their token ids."""
    from diffusers.training_utils import cast_training_params
    from peft import TrainableTokensConfig, inject_adapter_in_model

    from lora_tools.dreambooth import token_names

    names = token_names(cfg.NEW_TOKEN, cfg.NUM_NEW_TOKEN_VECTORS)
    if tokenizer.add_tokens(names) != len(names):
        raise UserError(f"NEW_TOKEN {cfg.NEW_TOKEN!r} (or one of {names}) is already in the tokenizer — pick a new string, e.g. '<zwx>'")
    ids = tokenizer.convert_tokens_to_ids(names)
    init_word = cfg.NEW_TOKEN_INIT_WORD or "object"
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids  # usually one token; a rare word gives several
    rows = max(len(tokenizer), text_encoder.get_input_embeddings().num_embeddings)  # (never shrink a padded table)
    text_encoder.resize_token_embeddings(rows, mean_resizing=False)  # a new, larger table: frozen again below
    table = text_encoder.get_input_embeddings().weight  # (vocab + n, d)
    table.requires_grad_(False)
    with torch.no_grad():  # Gal et al. 2023, Sec. 3: start from a coarse descriptor of the concept
        table[ids] = table[init_ids].float().mean(0).to(table.dtype)
    if not cfg.TRAIN_TEXT_ENCODER:
        inject_adapter_in_model(TrainableTokensConfig(target_modules=["token_embedding"], token_indices=ids), text_encoder, adapter_name="default")
        cast_training_params(text_encoder, dtype=torch.float32)
    print0(f"pivotal tuning: {cfg.NEW_TOKEN!r} = {' '.join(names)} (token ids {ids}), {len(ids)} x {table.shape[1]} numbers "
           f"starting as the embedding of {init_word!r}, learned at EMBEDDING_LEARNING_RATE={cfg.EMBEDDING_LEARNING_RATE:g}")
    return ids


def new_token_vectors(text_encoder):
    """The new token's learned rows (n, d): PEFT's trainable_tokens_delta (despite its name, the rows themselves)."""
    return next(p for n, p in text_encoder.named_parameters() if "trainable_tokens_delta" in n)


def text_encoder_trains(cfg):
    """Whether the text encoder's output changes during training (its LoRA, or a new token's embedding)."""
    return cfg.TRAIN_TEXT_ENCODER or cfg.NEW_TOKEN is not None


def encoder_prompts(cfg, prompts):
    """Prompts as the text encoder must see them: NEW_TOKEN stands for all its n vectors (what diffusers'
    maybe_convert_prompt does at inference once load_textual_inversion has added them)."""
    from lora_tools.dreambooth import expand_token

    return [expand_token(p, cfg.NEW_TOKEN, cfg.NUM_NEW_TOKEN_VECTORS) for p in prompts] if cfg.NEW_TOKEN else list(prompts)


# =============================================================================
# 5. Encode the data once: pixels and tokens -> latents and text embeddings
# =============================================================================
def tokenize(tokenizer, captions):
    """Captions -> CLIP token ids, padded/truncated to the tokenizer's 77 positions. (N, 77)"""
    limit = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(captions, truncation=False, verbose=False).input_ids]
    too_long = [c for c, n in zip(captions, lengths) if n > limit]
    if too_long:
        print0(f"note: {len(too_long)} caption(s) are longer than the text encoder's {limit} tokens and were cut "
               f"(e.g. {too_long[0][:60]!r}...)")
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
        return {"pixel_values": pixels.flip(-1) if flip else pixels, "input_ids": self.input_ids[i]}


class CachedLatents(torch.utils.data.Dataset):
    """Item (i, flip): the VAE posterior (mean, std) of image i (4, R/8, R/8), of its mirror image if
    flip, and its caption's text embedding (77, d). Sampling z0 from the posterior still happens every step."""

    def __init__(self, mean, std, text_emb, input_ids):
        self.mean, self.std, self.text_emb, self.input_ids = mean, std, text_emb, input_ids  # mean, std: (N, 1|2, 4, h, w)

    def __len__(self):
        return len(self.mean)

    def __getitem__(self, item):
        i, flip = item if isinstance(item, tuple) else (item, False)
        text = {"text_emb": self.text_emb[i]} if self.text_emb is not None else {"input_ids": self.input_ids[i]}
        return {"latent_mean": self.mean[i, int(flip)], "latent_std": self.std[i, int(flip)], **text}  # view 1 = mirrored


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

    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.BATCH_SIZE, num_workers=min(4, max(0, (os.cpu_count() or 1) - 1)))
    means, stds, embs = [], [], []
    for batch in tqdm(loader, desc="caching latents", disable=not show_progress):
        px = batch["pixel_values"]
        moments = [encode_images(vae, v) for v in ([px, px.flip(-1)] if cfg.RANDOM_FLIP else [px])]
        means.append(torch.stack([m for m, _ in moments], 1).cpu())  # (B, views, 4, h, w)
        stds.append(torch.stack([s for _, s in moments], 1).cpu())
        if not text_encoder_trains(cfg):  # a trained text encoder (or token) changes its output every step: no cache
            embs.append(encode_text(text_encoder, batch["input_ids"]).cpu())  # (B, 77, d)
    # not pinned: the DataLoader collates a new tensor per batch and pins that one (pin_memory=True)
    return CachedLatents(torch.cat(means), torch.cat(stds), torch.cat(embs) if embs else None, dataset.input_ids)


class EpochShuffle(torch.utils.data.Sampler):
    """Yields (index, flip) pairs: a fresh permutation and fresh flips per epoch, both a pure function
    of (seed, epoch), so a resumed run replays exactly the same data without saving sampler state,
    and every process of a multi-GPU run draws the same order (accelerate gives each its share)."""

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


def make_dataloader(dataset, cfg, cuda):
    from lora_tools.dreambooth import PairedImages, collate_pairs

    workers = cfg.DATALOADER_NUM_WORKERS
    if workers is None:  # cached latents are a tensor lookup; images need decoding
        workers = 0 if cfg.CACHE_LATENTS else min(4, max(0, (os.cpu_count() or 1) - 1))
    sampler = EpochShuffle(len(dataset), cfg.SEED, cfg.RANDOM_FLIP)
    pairs = isinstance(dataset, PairedImages)  # prior preservation: BATCH_SIZE subject + BATCH_SIZE class examples
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.BATCH_SIZE, sampler=sampler, num_workers=workers,
                                       pin_memory=cuda, persistent_workers=workers > 0, collate_fn=collate_pairs if pairs else None)


# =============================================================================
# 6. Train (DDPM, Ho et al. 2020, Algorithm 1 and Eq. 14, in latent space)
# =============================================================================
def min_snr_weights(noise_scheduler, t, gamma):
    """Min-SNR-γ (Hang et al. 2023, Sec. 3.4 and 4.2): weight each timestep's loss by min(SNR(t), γ),
    expressed for the network's target: ÷SNR(t) for ε-prediction, ÷(SNR(t)+1) for v-prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, t)  # SNR(t) = ᾱ_t / (1 - ᾱ_t)
    clipped = torch.clamp(snr, max=gamma)  # min(SNR(t), γ)
    return clipped / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else clipped / snr


def prior_preservation_weights(is_prior, prior_loss_weight):
    """DreamBooth's loss (Ruiz et al. 2023, Sec. 3.3, Eq. 2) = subject loss + λ·class loss, each a mean
    over its own examples, as per-example weights of one batch mean: N/n_subject for a subject
    example, λ·N/n_class for a class example (N = batch size). Per micro-batch and per process, so
    gradient accumulation and data parallelism average exactly this loss. is_prior: (N,) bool."""
    n, n_prior = len(is_prior), int(is_prior.sum())
    subject, prior = n / (n - n_prior), prior_loss_weight * n / n_prior  # collate_pairs: always half and half
    return torch.where(is_prior, prior, subject).to(torch.float32)


def compute_loss(batch, unet, noise_scheduler, scaling_factor, vae=None, text_encoder=None, snr_gamma=None, noise_offset=0.0,
                 example_weights=None):
    """One denoising-loss evaluation: batch -> z0, c -> noise -> z_t -> prediction -> MSE.
    A cached batch carries the encoders' outputs; otherwise the frozen encoders run now
    (what most trainers do at every step, though their output never changes).
    example_weights (B,): each example's loss is multiplied by its weight before the batch mean."""
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
        target = noise_scheduler.get_velocity(latents, noise, t)  # v = √ᾱ_t·ε − √(1-ᾱ_t)·z0 (Salimans & Ho 2022)
    else:
        raise UserError(f"the scheduler's prediction_type {prediction_type!r} is not supported (epsilon or v_prediction)")
    if snr_gamma is None and example_weights is None:
        return mse_loss(model_pred.float(), target.float(), reduction="mean")  # in fp32 whatever the autocast
    per_image = mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma is not None:
        per_image = per_image * min_snr_weights(noise_scheduler, t, snr_gamma)
    if example_weights is not None:  # prior preservation: 1 for the subject, λ for the class, normalised per half
        per_image = per_image * example_weights.to(per_image.device)
    return per_image.mean()


def make_optimizer(models, cfg, cuda):
    """AdamW over the LoRA tensors: fused into one kernel on a GPU, multi-tensor (foreach) on a CPU,
    or bitsandbytes' 8-bit AdamW. Parameter groups: LoRA+ (Hayou et al. 2024) lets the B matrices
    learn at LEARNING_RATE x LORAPLUS_LR_RATIO; the text encoder has its own rate."""
    groups = []
    for model, lr in models:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        token = [p for n, p in named if "trainable_tokens_delta" in n]  # NEW_TOKEN's rows (pivotal tuning)
        named = [(n, p) for n, p in named if "trainable_tokens_delta" not in n]
        groups.append({"params": [p for n, p in named if "lora_B" not in n], "lr": lr})  # A (and DoRA's magnitudes)
        groups.append({"params": [p for n, p in named if "lora_B" in n], "lr": lr * (cfg.LORAPLUS_LR_RATIO or 1.0)})
        # no weight decay on the token: it would pull the vectors towards 0, not towards any word
        groups.append({"params": token, "lr": cfg.EMBEDDING_LEARNING_RATE, "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    if cfg.USE_8BIT_ADAM:
        import bitsandbytes as bnb  # check_environment made sure it is installed

        if not cuda:
            raise UserError("USE_8BIT_ADAM=True needs a CUDA GPU — use --USE_8BIT_ADAM=False on a CPU")
        return bnb.optim.AdamW8bit(groups, lr=cfg.LEARNING_RATE, weight_decay=cfg.ADAM_WEIGHT_DECAY)
    return torch.optim.AdamW(groups, lr=cfg.LEARNING_RATE, weight_decay=cfg.ADAM_WEIGHT_DECAY,
                             fused=True if cuda else None, foreach=None if cuda else True)


# --- checkpoints: everything an exact continuation needs (lora_tools/checkpoint.py) ---------------
def save_training_checkpoint(cfg, step, unet, text_encoder, optimizer, lr_scheduler, accelerator):
    """checkpoint-<step>/: the LoRA (fp32, so resuming is exact), optimizer, schedule, scaler, and
    every process's own RNG states. Called on every process; the main process writes."""
    from accelerate.utils import gather_object

    from lora_tools.checkpoint import rng_states, save_checkpoint
    from lora_tools.dreambooth import save_embedding

    rngs = gather_object([rng_states()])  # [process 0's, process 1's, ...] on every process
    if not accelerator.is_main_process:
        return None

    def write(folder):  # fp32, so that resuming is exact
        save_lora(os.path.join(folder, WEIGHTS_NAME), unet, cfg, text_encoder if cfg.TRAIN_TEXT_ENCODER else None, dtype=torch.float32)
        if cfg.NEW_TOKEN:
            save_embedding(os.path.join(folder, embedding_name(cfg)), new_token_vectors(text_encoder))

    return save_checkpoint(cfg.OUTPUT_DIR, step, write, optimizer, lr_scheduler, accelerator.scaler, rngs,
                           {"global_step": step}, cfg.to_json(), cfg.CHECKPOINTS_TOTAL_LIMIT)


def check_resume(path, cfg):
    """Fail before any slow work when checkpoint `path` cannot continue this run: its LoRA's shape differs."""
    from lora_tools.checkpoint import checkpoint_config

    old, now = checkpoint_config(path), cfg.as_dict()
    for key in ("LORA_RANK", "TARGET_MODULES", "USE_DORA", "TRAIN_TEXT_ENCODER", "TEXT_ENCODER_TARGET_MODULES", "NEW_TOKEN",
                "NUM_NEW_TOKEN_VECTORS"):
        before = old.get(key, globals()[key])  # a key the checkpoint lacks had its default then
        if before != now[key]:
            raise UserError(f"{path} was trained with {key}={before!r}, this run has {now[key]!r} — use the same --{key} to resume")


def restore_checkpoint(path, cfg, unet, text_encoder, optimizer, lr_scheduler, accelerator):
    """Load the LoRA weights, optimizer, schedule and scaler state of checkpoint `path`. Returns
    (global_step, this process's RNG states, or None when the checkpoint has none for it)."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    from lora_tools.checkpoint import load_checkpoint

    lora, state, old = load_checkpoint(path)
    now = cfg.as_dict()
    changed = [k for k in ("BATCH_SIZE", "GRADIENT_ACCUMULATION_STEPS", "SEED", "LORA_ALPHA", "LEARNING_RATE") if old.get(k) != now[k]]
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one per process that wrote it
    if len(rngs) != accelerator.num_processes:
        changed.append(f"the number of processes ({len(rngs)} then, {accelerator.num_processes} now)")
    if changed:
        print0(f"note: {', '.join(changed)} differ from the checkpoint's run: the continuation will not be exact")
    parts = [("unet.", unet, convert_unet_state_dict_to_peft)]
    if cfg.TRAIN_TEXT_ENCODER:
        parts.append(("text_encoder.", text_encoder, convert_state_dict_to_peft))
    for prefix, model, to_peft in parts:
        sd = to_peft({k[len(prefix):]: v for k, v in lora.items() if k.startswith(prefix)})
        result = set_peft_model_state_dict(model, sd, adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"{path} does not match this model: unexpected keys such as {result.unexpected_keys[0]}")
    if cfg.NEW_TOKEN:  # the new token's rows, as they were at that step
        from safetensors.torch import load_file

        with torch.no_grad():
            new_token_vectors(text_encoder).copy_(load_file(os.path.join(path, embedding_name(cfg)))["emb_params"])
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    rank = accelerator.process_index
    return state["position"]["global_step"], rngs[rank] if rank < len(rngs) else None


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
        import signal

        for s, handler in self.previous.items():
            signal.signal(s, handler)


class MetricsLog:
    """OUTPUT_DIR/metrics.jsonl, one line {step, loss, lr, epoch} per LOG_EVERY optimizer steps
    (a resumed run keeps the lines up to its checkpoint's step), and tensorboard when REPORT_TO."""

    def __init__(self, cfg, accelerator, resume_step):
        from lora_tools.pictures import read_metrics  # ignores a last line cut short by a crash

        self.path, self.accelerator, self.report = os.path.join(cfg.OUTPUT_DIR, "metrics.jsonl"), accelerator, cfg.REPORT_TO
        if accelerator.is_main_process:
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if resume_step and os.path.exists(self.path) else []
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if cfg.REPORT_TO:
            accelerator.init_trackers("lora", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                      for k, v in cfg.as_dict().items()})

    def write(self, record):
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.report:
            self.accelerator.log({"loss": record["loss"], "lr": record["lr"]}, step=record["step"])


def train(cfg, accelerator, unet, text_encoder, train_models, optimizer, lr_scheduler, dataloader, noise_scheduler,
          scaling_factor, max_steps, start_step=0, resume_rng=None, vae=None, argv=(), tokenizer=None):
    """The training loop. train_models: the models being trained as accelerate prepared them (DDP /
    compiled wrappers around `unet` and `text_encoder`). Returns the number of optimizer steps done."""
    from tqdm.auto import tqdm

    from lora_tools.checkpoint import set_rng_states

    steps_per_epoch = math.ceil(len(dataloader) / cfg.GRADIENT_ACCUMULATION_STEPS)
    first_epoch, skip = divmod(start_step, steps_per_epoch)
    skip *= cfg.GRADIENT_ACCUMULATION_STEPS  # micro-batches of the resumed epoch already trained on
    lora_params = [p for m in train_models for p in m.parameters() if p.requires_grad]
    train_unet, train_te = train_models[0], (train_models[1] if len(train_models) > 1 else text_encoder)
    metrics, stop = MetricsLog(cfg, accelerator, start_step), StopRequest()
    progress = tqdm(total=max_steps, initial=start_step, desc="training", disable=not accelerator.is_local_main_process)
    step, loss_sum, n_losses, t0, resuming = start_step, 0.0, 0, time.time(), start_step > 0
    for m in train_models:
        m.train()
    try:
        for epoch in range(first_epoch, math.ceil(max_steps / steps_per_epoch)):
            dataloader.set_epoch(epoch)  # a new permutation and new flips (EpochShuffle), the same on every process
            batches = iter(dataloader)
            if resuming:  # exact resume: skip what was trained on, then restore this process's RNGs
                for _ in range(skip):
                    next(batches)
                if resume_rng is not None:
                    set_rng_states(resume_rng)
                resuming = False
            for batch in batches:
                with accelerator.accumulate(*train_models):  # the optimizer steps on the last micro-batch only
                    # DreamBooth: the batch holds subject and class examples; Eq. 2 weighs their two means 1 : λ
                    weights = prior_preservation_weights(batch["is_prior"], cfg.PRIOR_LOSS_WEIGHT) if "is_prior" in batch else None
                    loss = compute_loss(batch, train_unet, noise_scheduler, scaling_factor, vae, train_te,
                                        snr_gamma=cfg.SNR_GAMMA, noise_offset=cfg.NOISE_OFFSET, example_weights=weights)  # noise -> predict -> loss
                    accelerator.backward(loss)  # gradients reach A and B only (fp16: the loss is scaled first)
                    if accelerator.sync_gradients and cfg.MAX_GRAD_NORM is not None:
                        accelerator.clip_grad_norm_(lora_params, cfg.MAX_GRAD_NORM)  # a list, not a spent generator
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum, n_losses = loss_sum + loss.detach(), n_losses + 1
                if not accelerator.sync_gradients:
                    continue
                lr = lr_scheduler.get_last_lr()[0]
                lr_scheduler.step()
                step += 1
                progress.update(1)
                due = step % cfg.LOG_EVERY == 0 or step == max_steps
                if due:  # log: one device->host read every LOG_EVERY steps
                    loss_mean = accelerator.reduce(loss_sum / n_losses, "mean").item()
                    metrics.write({"step": step, "loss": loss_mean, "lr": lr, "epoch": epoch})
                    progress.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{lr:.2e}")
                    loss_sum, n_losses = 0.0, 0
                    if not math.isfinite(loss_mean):
                        raise UserError(f"training diverged: the loss became {loss_mean} by step {step} — lower LEARNING_RATE, "
                                        "use bf16 rather than fp16 (or --VAE_FP32=True), or MIXED_PRECISION=no; "
                                        "no weights were written, earlier checkpoints are kept")
                if cfg.VALIDATION_STEPS and step % cfg.VALIDATION_STEPS == 0 and step < max_steps:
                    if accelerator.is_main_process:
                        progress.write(f"validation images: {log_validation(cfg, accelerator, unet, text_encoder, step, tokenizer)}")
                    for m in train_models:
                        m.train()
                periodic = bool(cfg.CHECKPOINTING_STEPS) and step % cfg.CHECKPOINTING_STEPS == 0
                stopping = stop.agreed(accelerator, sync_now=due or periodic)
                if (periodic or stopping) and step < max_steps:
                    path = save_training_checkpoint(cfg, step, unet, text_encoder, optimizer, lr_scheduler, accelerator)
                    if path:
                        progress.write(f"checkpoint: {path}")
                    if stopping:
                        progress.close()
                        print0(f"stopped at step {step}; resume with:\n  {resume_command(argv, os.path.join(cfg.OUTPUT_DIR, f'checkpoint-{step}'))}")
                        sys.exit(130 if stop.signum == 2 else 143)
                if step >= max_steps:
                    break
    finally:
        stop.restore()
        progress.close()  # before any error message, so it starts on a line of its own
    print0(f"trained {step - start_step} steps in {time.time() - t0:.1f}s; {peak_memory_text(accelerator, 'training')}")
    return step


def resume_command(argv, checkpoint):
    import shlex

    kept = [a for a in argv if not a.startswith("--RESUME_FROM=")]
    return shlex.join(["python", os.path.basename(__file__), *kept, f"--RESUME_FROM={checkpoint}"])


def peak_memory_text(accelerator, phase):
    """Peak memory since the last call: on a GPU what tensors held (torch.cuda.max_memory_allocated;
    the caching allocator reserves somewhat more), on a CPU the process's resident-set high-water mark."""
    if accelerator.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return f"peak GPU memory allocated while {phase}: {peak / 2**30:.2f} GB"
    import resource

    return f"peak host memory (RSS) so far: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB"  # ru_maxrss: KiB


@torch.no_grad()
def log_validation(cfg, accelerator, unet, text_encoder, step, tokenizer=None):
    """Mid-training pictures: the model being trained, wrapped in a pipeline (VAE and, unless trained,
    text encoder reloaded from MODEL_ID), rendering VALIDATION_PROMPTS into validation/step-<N>.png."""
    from lora_tools.pictures import image_grid

    parts = dict(unet=unet, text_encoder=text_encoder) if text_encoder_trains(cfg) else dict(unet=unet)
    if cfg.NEW_TOKEN:  # the tokenizer that knows the new token (the pipeline expands it in the prompts)
        parts["tokenizer"] = tokenizer
    pipe = load_pipeline(cfg, frozen_dtype(unet), **parts).to(accelerator.device)
    for model in (parts.get("unet"), parts.get("text_encoder")):
        if model is not None:
            model.eval()
    seeds = [cfg.SEED + i for i in range(cfg.NUM_VALIDATION_SEEDS)]
    with accelerator.autocast():
        images = render(pipe, cfg, cfg.VALIDATION_PROMPTS, seeds)
    grid = image_grid(images, rows=len(cfg.VALIDATION_PROMPTS), labels=[f"seed {s}" for s in seeds],
                      row_labels=list(cfg.VALIDATION_PROMPTS))
    path = os.path.join(cfg.OUTPUT_DIR, "validation", f"step-{step:06d}.png")
    save_png(grid, path)
    return path


# =============================================================================
# 7. Save the adapter, then check that the file is the model we trained
# =============================================================================
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def without_token_rows(peft_state_dict):
    """A PEFT state dict minus NEW_TOKEN's rows (…token_embedding[.token_adapter].trainable_tokens_delta):
    they go to their own file, <OUTPUT_NAME>_emb.safetensors, which is what diffusers, WebUI and ComfyUI load."""
    return {k: v for k, v in peft_state_dict.items() if "trainable_tokens" not in k}


def embedding_name(cfg):
    return f"{cfg.OUTPUT_NAME}_emb.safetensors"


def lora_state_dict(unet, text_encoder=None, dtype=torch.float32):
    """The LoRA tensors under diffusers' key names ('unet.' / 'text_encoder.' prefixes), on the CPU."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    tensors = {}
    for prefix, model in (("unet", unet), ("text_encoder", text_encoder)):
        if model is not None:
            sd = convert_state_dict_to_diffusers(without_token_rows(get_peft_model_state_dict(model)))
            tensors.update({f"{prefix}.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in sd.items()})
    return tensors


def lora_file_metadata(unet, cfg, text_encoder=None):
    """safetensors metadata: diffusers reads 'lora_adapter_metadata' (rank, alpha, targets, DoRA/rsLoRA)
    to rebuild each adapter at its trained strength; 'training_config' records how it was made."""
    lora_meta = {}
    for prefix, model in (("unet", unet), ("text_encoder", text_encoder)):
        if model is not None:
            config = model.peft_config["default"].to_dict()
            config.pop("trainable_token_indices", None)  # NEW_TOKEN's rows are not in this file (see without_token_rows)
            config["lora_dropout"] = 0.0  # LORA_DROPOUT regularises training only; a loader would build live dropout from it
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


def fixed_unet_input(unet, vae_scale, resolution, device, seed=1234):
    g = torch.Generator().manual_seed(seed)
    h = resolution // vae_scale
    z = torch.randn(1, unet.config.in_channels, h, h, generator=g)
    c = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    return z.to(device), torch.tensor([500], device=device), c.to(device)  # fp32: autocast casts them


@torch.no_grad()
def check_saved_lora(unet, path, cfg, vae_scale, autocast):
    """Reload the file the way diffusers does (load_lora_adapter reads the alpha metadata) into the
    same frozen base, and compare with the trained adapter on one fixed input."""
    z, t, c = fixed_unet_input(unet, vae_scale, cfg.RESOLUTION, unet.device)
    unet.eval()  # no LoRA dropout in the comparison
    with autocast():
        y_trained = unet(z, t, c, return_dict=False)[0].float()
        unet.disable_adapters()
        y_base = unet(z, t, c, return_dict=False)[0].float()
        unet.enable_adapters()
        # folder + weight_name: diffusers reads the alpha metadata only on its safetensors path
        with warnings.catch_warnings():  # PEFT warns that this adds a second adapter: here that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            unet.load_lora_adapter(os.path.dirname(path), weight_name=os.path.basename(path), prefix="unet", adapter_name="reloaded")
        unet.set_adapter("reloaded")
        unet.eval()  # the new adapter's dropout modules were created in training mode
        y_reloaded = unet(z, t, c, return_dict=False)[0].float()
    unet.set_adapter("default")
    unet.delete_adapters("reloaded")
    diff = (y_reloaded - y_trained).abs().max().item()
    effect = (y_trained - y_base).abs().max().item()
    compute_eps = 1e-5 if frozen_dtype(unet) == torch.float32 else 1e-2  # rounding of the forward pass itself
    save_eps = 1e-2 if cfg.SAVE_DTYPE == "fp16" else 0.0  # fp16 files round B and A (a wrong alpha is off by ~100%)
    tolerance = compute_eps * max(1.0, y_trained.abs().max().item()) + save_eps * effect
    if diff > tolerance:
        raise RuntimeError(f"the saved LoRA does not reproduce the trained model (max difference {diff:.3g} > {tolerance:.3g})")
    print0(f"reload check: saved file vs trained model, max |Δoutput| = {diff:.2e} (LoRA's own effect {effect:.2e})")


def save_webui_file(cfg, unet, text_encoder, steps, num_images, t_start):
    """OUTPUT_DIR/<OUTPUT_NAME>.safetensors with kohya-style keys (lora_unet_..., lora_te_...,
    .lora_down/.lora_up/.alpha): the format Stable Diffusion WebUI and ComfyUI read."""
    from peft.utils import get_peft_model_state_dict

    from lora_tools.kohya import kohya_metadata, save_kohya_file

    if cfg.USE_DORA:
        print0("note: USE_DORA=True — no WebUI/ComfyUI file written (their DoRA key conventions differ); use the diffusers file")
        return None
    te_sd = without_token_rows(get_peft_model_state_dict(text_encoder)) if text_encoder is not None else {}
    info = dict(cfg.as_dict(), steps=steps, num_images=num_images, started_at=t_start, finished_at=time.time())
    path = os.path.join(cfg.OUTPUT_DIR, f"{cfg.OUTPUT_NAME}.safetensors")
    # kohya files always mean an α/r scale; with rsLoRA (α/√r) the file carries α' = α·√r
    save_kohya_file(path, get_peft_model_state_dict(unet), te_sd, cfg.LORA_ALPHA, cfg.LORA_ALPHA, kohya_metadata(info),
                    SAVE_DTYPES[cfg.SAVE_DTYPE], use_rslora=cfg.USE_RSLORA)
    return path


def save_and_check(cfg, accelerator, unet, text_encoder, vae_scale, steps, num_images, t_start):
    """The adapter files, the config, the reload check, and the pictures of the run itself.
    text_encoder: the trained text encoder (its LoRA and/or NEW_TOKEN's rows), or None."""
    from lora_tools.dreambooth import save_embedding
    from lora_tools.pictures import read_metrics, save_loss_curve, save_spectrum_plot
    from lora_tools.spectrum import lora_updates, spectrum_table

    weights_path = os.path.join(cfg.OUTPUT_DIR, WEIGHTS_NAME)
    lora_te = text_encoder if cfg.TRAIN_TEXT_ENCODER else None
    n = save_lora(weights_path, unet, cfg, lora_te)
    kohya_path = save_webui_file(cfg, unet, lora_te, steps, num_images, t_start)
    atomic_write_text(os.path.join(cfg.OUTPUT_DIR, "training_config.json"), cfg.to_json() + "\n")
    print0(f"saved {n:,} LoRA parameters to {weights_path} ({os.path.getsize(weights_path) / 1e6:.2f} MB, {cfg.SAVE_DTYPE})"
           + (f" and {kohya_path} (WebUI/ComfyUI keys)" if kohya_path else ""))
    if cfg.NEW_TOKEN:  # textual-inversion file: {"emb_params": (n, d)}, for load_textual_inversion and WebUI/ComfyUI's embeddings/
        emb_path = os.path.join(cfg.OUTPUT_DIR, embedding_name(cfg))
        save_embedding(emb_path, new_token_vectors(text_encoder), SAVE_DTYPES[cfg.SAVE_DTYPE])
        print0(f"saved the embedding of {cfg.NEW_TOKEN!r} ({cfg.NUM_NEW_TOKEN_VECTORS} vectors) to {emb_path}")
    check_saved_lora(unet, weights_path, cfg, vae_scale, accelerator.autocast)
    # a look inside the adapter: how many directions each learned update ΔW = (α/r)·B·A really uses
    if cfg.USE_DORA:
        print0("note: USE_DORA=True — no rank spectrum (a DoRA update also rescales W0's columns, it is not (α/r)·B·A)")
    else:
        rows, text = spectrum_table(lora_updates(unet))
        print0(text)
        save_spectrum_plot(rows, os.path.join(cfg.OUTPUT_DIR, "rank_spectrum.png"))
    records = read_metrics(os.path.join(cfg.OUTPUT_DIR, "metrics.jsonl"))
    if records:
        save_loss_curve(records, os.path.join(cfg.OUTPUT_DIR, "loss_curve.png"))


# =============================================================================
# 8. Load base + LoRA as any user would, and generate
# =============================================================================
def load_pipeline(cfg, dtype, **parts):
    """StableDiffusionPipeline.from_pretrained (parts: models to use instead of MODEL_ID's); with
    VAE_FP32 its VAE is fp32 whatever `dtype` the rest has (render then decodes the latents itself)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    if cfg.VAE_FP32:  # read in fp32 as training read it (cast up from `dtype`, it would keep that dtype's rounding)
        parts.setdefault("vae", AutoencoderKL.from_pretrained(cfg.MODEL_ID, subfolder="vae", revision=cfg.REVISION, dtype=torch.float32))
    pipe = StableDiffusionPipeline.from_pretrained(cfg.MODEL_ID, revision=cfg.REVISION, dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline_with_lora(cfg, weights_dir, dtype, weight_name=WEIGHTS_NAME):
    """load_pipeline + load_lora_weights (+ load_textual_inversion with NEW_TOKEN): plain diffusers, nothing of ours."""
    import logging

    pipe = load_pipeline(cfg, dtype)
    # diffusers logs "No LoRA keys associated to CLIPTextModel" for a UNet-only file, the usual kind: drop that line only
    no_text_encoder_notice = lambda record: "No LoRA keys associated to CLIPTextModel" not in record.getMessage()  # noqa: E731
    logger = logging.getLogger("diffusers.loaders.lora_base")
    logger.addFilter(no_text_encoder_notice)
    try:
        pipe.load_lora_weights(weights_dir, weight_name=weight_name)
    finally:
        logger.removeFilter(no_text_encoder_notice)
    if cfg.NEW_TOKEN:  # adds <t>, <t>_1, ... to the tokenizer; pipe(prompt) then expands <t> into all of them
        # transformers announces how it fills the new rows, which diffusers then overwrites: drop that line only
        no_resize_notice = lambda record: "mean_resizing" not in record.getMessage()  # noqa: E731
        logger = logging.getLogger("transformers.modeling_utils")
        logger.addFilter(no_resize_notice)
        try:
            pipe.load_textual_inversion(os.path.join(weights_dir, embedding_name(cfg)), token=cfg.NEW_TOKEN)
        finally:
            logger.removeFilter(no_resize_notice)
    return pipe


@torch.no_grad()
def render(pipe, cfg, prompts, seeds):
    """One image per (prompt, seed), each from its own CPU generator: the same noise on any device."""
    images = []
    for p in prompts:
        for s in seeds:
            kw = dict(height=cfg.RESOLUTION, width=cfg.RESOLUTION, num_inference_steps=cfg.NUM_INFERENCE_STEPS,
                      guidance_scale=cfg.GUIDANCE_SCALE, generator=torch.Generator().manual_seed(s))
            if pipe.vae.dtype == pipe.unet.dtype:
                images.append(pipe(p, **kw).images[0])
            else:  # VAE_FP32: the pipeline would feed fp16 latents to the fp32 VAE; decode them in fp32 here
                latents = pipe(p, output_type="latent", **kw).images
                decoded = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
                images.append(pipe.image_processor.postprocess(decoded)[0])
    return images


def reproduce_recipe(cfg, dtype, device):
    """The plain-diffusers lines that render test_generation.png again: same dtype, device and seed."""
    fp32_vae = cfg.VAE_FP32 and dtype != torch.float32
    vae = f"vae=AutoencoderKL.from_pretrained({cfg.MODEL_ID!r}, subfolder='vae', dtype=torch.float32), " if fp32_vae else ""
    lines = [f"import torch; from diffusers import {'AutoencoderKL, ' if fp32_vae else ''}StableDiffusionPipeline",
             f"pipe = StableDiffusionPipeline.from_pretrained({cfg.MODEL_ID!r}, dtype={dtype}, {vae}safety_checker=None).to({str(device)!r})",
             f"pipe.load_lora_weights({cfg.OUTPUT_DIR!r})"]
    if cfg.NEW_TOKEN:
        lines.append(f"pipe.load_textual_inversion({os.path.join(cfg.OUTPUT_DIR, embedding_name(cfg))!r}, token={cfg.NEW_TOKEN!r})")
    call = (f"pipe({cfg.VALIDATION_PROMPTS[0]!r}, height={cfg.RESOLUTION}, width={cfg.RESOLUTION}, "
            f"num_inference_steps={cfg.NUM_INFERENCE_STEPS}, guidance_scale={cfg.GUIDANCE_SCALE}, "
            f"generator=torch.Generator().manual_seed({cfg.SEED})")
    if fp32_vae:  # VAE_FP32: decode the latents in fp32
        lines += [f"latents = {call}, output_type='latent').images",
                  "with torch.no_grad(): image = pipe.image_processor.postprocess(pipe.vae.decode(latents.float() / pipe.vae.config.scaling_factor).sample)[0]"]
    else:
        lines.append(f"image = {call}).images[0]")
    return "\n".join("  " + line for line in lines)


def save_png(image, path):
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def merge_and_save(cfg, folder):
    """SAVE_MERGED_MODEL: W = W0 + (α/r)·B·A written into the base weights (Hu et al. 2021, Sec. 4.1:
    no extra inference latency), saved as a full pipeline folder that needs no LoRA loading.
    Fused in fp32 on the CPU (in bf16 an update smaller than 1/256 of a weight would round away),
    then saved in SAVE_DTYPE."""
    import shutil
    import tempfile

    pipe = load_pipeline_with_lora(cfg, cfg.OUTPUT_DIR, torch.float32)
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()  # the fused weights stay; only the adapter modules go
    pipe.to(SAVE_DTYPES[cfg.SAVE_DTYPE])
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(folder)), prefix=".merged-")
    try:
        pipe.save_pretrained(tmp)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate(cfg, accelerator, dtype):
    """test_generation.png and comparison.png from base + LoRA loaded by plain diffusers, and the
    merged model when asked for."""
    from lora_tools.pictures import comparison_image

    pipe = load_pipeline_with_lora(cfg, cfg.OUTPUT_DIR, dtype).to(accelerator.device)
    image_path = os.path.join(cfg.OUTPUT_DIR, "test_generation.png")
    save_png(render(pipe, cfg, cfg.VALIDATION_PROMPTS[:1], [cfg.SEED])[0], image_path)
    print0(f"test image: {image_path} — reproduce it with plain diffusers:\n{reproduce_recipe(cfg, dtype, accelerator.device)}")
    notes = None
    if cfg.DEMO:  # the demo's world can be judged by a program: how often is purple drawn, with and without the LoRA?
        from lora_tools.shapes import concept_report

        notes = concept_report(pipe, seeds=[0, 1, 2, 3], steps=cfg.NUM_INFERENCE_STEPS, guidance_scale=cfg.GUIDANCE_SCALE,
                               log=print0, path=os.path.join(cfg.OUTPUT_DIR, "concept_scores.json"))
    # comparison.png: the same prompts and seed without (top) and with (bottom) the LoRA; DreamBooth
    # adds the subject's prompt and the class prompt (does the class still look like the base model's?)
    prompts = list(dict.fromkeys([p for p in (cfg.INSTANCE_PROMPT, cfg.CLASS_PROMPT) if p] + list(cfg.VALIDATION_PROMPTS)))
    token = " + token" if cfg.NEW_TOKEN else ""  # the learned token is no LoRA: disable_lora keeps it
    pipe.disable_lora()
    base = render(pipe, cfg, prompts, [cfg.SEED])
    pipe.enable_lora()
    tuned = render(pipe, cfg, prompts, [cfg.SEED])
    rows = {f"base model{token}": base, f"base{token} + LoRA": tuned}
    notes = dict(zip(rows, notes.values())) if notes else None
    save_png(comparison_image(rows, prompts, notes),
             os.path.join(cfg.OUTPUT_DIR, "comparison.png"))
    del pipe
    if cfg.SAVE_MERGED_MODEL:
        merged = os.path.join(cfg.OUTPUT_DIR, "merged_pipeline")
        merge_and_save(cfg, merged)
        print0(f"merged pipeline (LoRA fused into the weights, {cfg.SAVE_DTYPE}): {merged}")


# =============================================================================
# The run: sections 1-8 in order
# =============================================================================
def main(argv):
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import free_memory

    from lora_tools.checkpoint import resolve_resume

    # --- 1. configuration, checked before anything slow -----------------------------
    cfg = resolve_config(argv)
    accelerator, weight_dtype = start(cfg)
    cuda, main_process = accelerator.device.type == "cuda", accelerator.is_main_process
    resume_path = resolve_resume(cfg.RESUME_FROM, cfg.OUTPUT_DIR)
    if cfg.RESUME_FROM == "latest" and resume_path is None:
        print0(f"RESUME_FROM=latest: no checkpoint in {cfg.OUTPUT_DIR} yet, starting a new run")
    if resume_path is not None:
        check_resume(resume_path, cfg)

    # --- 2. data: listed and decoded once, so a bad folder fails before any download -----
    images, captions = load_captioned_images(cfg, show_progress=accelerator.is_local_main_process)
    captions = subject_captions(cfg, captions)  # INSTANCE_PROMPT, when set, replaces every caption
    # DreamBooth's prior preservation: the base model's own pictures of the class, drawn once
    class_paths = class_image_paths(cfg, accelerator, weight_dtype) if cfg.CLASS_PROMPT else None

    # --- 3. load and freeze -----------------------------------------------------------
    set_seed(cfg.SEED)  # the same on every process, so every process starts from the same LoRA
    vae_dtype = torch.float32 if cfg.VAE_FP32 else weight_dtype
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_models(cfg, weight_dtype, vae_dtype)
    freeze(text_encoder, vae, unet)
    base_params = count_params(unet)
    text_encoder, vae, unet = (m.to(accelerator.device) for m in (text_encoder, vae, unet))  # no loop variable left holding the UNet
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)  # SD1.x: 8 (512 px -> 64x64 latents)

    # --- 4. add LoRA ------------------------------------------------------------------
    lora_params = add_lora(unet, cfg, cfg.TARGET_MODULES)
    # pivotal tuning: NEW_TOKEN's embedding rows train with the LoRA (with the text encoder's LoRA, if any)
    token_ids = add_new_token(tokenizer, text_encoder, cfg) if cfg.NEW_TOKEN else None
    if cfg.TRAIN_TEXT_ENCODER:
        lora_params += add_lora(text_encoder, cfg, cfg.TEXT_ENCODER_TARGET_MODULES, "TEXT_ENCODER_TARGET_MODULES", token_ids)
    trainable = sum(p.numel() for p in lora_params)
    scale = cfg.LORA_ALPHA / (math.sqrt(cfg.LORA_RANK) if cfg.USE_RSLORA else cfg.LORA_RANK)
    print0(f"LoRA r={cfg.LORA_RANK}, α={cfg.LORA_ALPHA} (scale {'α/√r' if cfg.USE_RSLORA else 'α/r'} = {scale:g}"
           f"{', DoRA' if cfg.USE_DORA else ''}) on {list(cfg.TARGET_MODULES)}{' + text encoder' if cfg.TRAIN_TEXT_ENCODER else ''}")
    print0(f"trainable LoRA parameters: {trainable:,} = {100 * trainable / base_params:.3f}% of the UNet's {base_params:,} (frozen)")
    if cfg.GRADIENT_CHECKPOINTING:
        unet.enable_gradient_checkpointing()

    # --- 5. encode the data once --------------------------------------------------------
    dataset = CaptionedImages(images, tokenize(tokenizer, encoder_prompts(cfg, captions)), cfg)
    if class_paths:  # the class pictures, all with CLASS_PROMPT
        class_dataset = CaptionedImages(class_paths, tokenize(tokenizer, [cfg.CLASS_PROMPT] * len(class_paths)), cfg)
    scaling_factor = vae.config.scaling_factor  # SD1.x: 0.18215, puts z0 at roughly unit variance
    if cfg.CACHE_LATENTS:
        if cfg.NEW_TOKEN:
            print0(f"note: only latents are cached: a prompt holding {cfg.NEW_TOKEN!r} has no fixed text embedding to cache "
                   "(its vectors change every step), so the text encoder runs at every step")
        dataset = cache_latents(dataset, vae, text_encoder, cfg, show_progress=accelerator.is_local_main_process)
        if class_paths:
            class_dataset = cache_latents(class_dataset, vae, text_encoder, cfg, show_progress=accelerator.is_local_main_process)
        vae = None  # done with the frozen encoders: free their memory for the UNet
        text_encoder = text_encoder if text_encoder_trains(cfg) else None
        free_memory()
        print0(peak_memory_text(accelerator, "caching latents"))
    if class_paths:  # each item: a subject example and a class example (Ruiz et al. 2023, Sec. 3.3)
        from lora_tools.dreambooth import PairedImages

        dataset = PairedImages(dataset, class_dataset)
    dataloader = make_dataloader(dataset, cfg, cuda)

    # --- 6. train -------------------------------------------------------------------------
    optimizer = make_optimizer([(unet, cfg.LEARNING_RATE)] + ([(text_encoder, cfg.TEXT_ENCODER_LEARNING_RATE or cfg.LEARNING_RATE)]
                                                              if text_encoder_trains(cfg) else []), cfg, cuda)
    # `unet` and `text_encoder` stay the plain models (saved, validated); accelerate wraps what trains
    train_models = [torch.compile(unet) if cfg.COMPILE else unet] + ([text_encoder] if text_encoder_trains(cfg) else [])
    *train_models, optimizer, dataloader = accelerator.prepare(*train_models, optimizer, dataloader)
    steps_per_epoch = math.ceil(len(dataloader) / cfg.GRADIENT_ACCUMULATION_STEPS)
    max_steps = cfg.MAX_TRAIN_STEPS or cfg.NUM_EPOCHS * steps_per_epoch
    lr_scheduler = get_scheduler(cfg.LR_SCHEDULER, optimizer=optimizer, num_warmup_steps=cfg.LR_WARMUP_STEPS,
                                 num_training_steps=max_steps)  # stepped once per optimizer step
    effective_batch = cfg.BATCH_SIZE * cfg.GRADIENT_ACCUMULATION_STEPS * accelerator.num_processes
    pairs = f" subject + {len(class_paths)} class images (each batch: {cfg.BATCH_SIZE} of each)" if class_paths else " images"
    print0(f"{len(images)}{pairs} at {cfg.RESOLUTION}px (latents 4x{cfg.RESOLUTION // vae_scale}x{cfg.RESOLUTION // vae_scale}) | "
           f"effective batch {effective_batch} = {cfg.BATCH_SIZE} x {cfg.GRADIENT_ACCUMULATION_STEPS} accumulation x "
           f"{accelerator.num_processes} process(es) | {steps_per_epoch} steps/epoch, {max_steps} steps, "
           f"{math.ceil(max_steps / steps_per_epoch)} epochs | {'cached latents' if cfg.CACHE_LATENTS else 'encoding every step'}")
    start_step, resume_rng = 0, None
    if resume_path is not None:
        start_step, resume_rng = restore_checkpoint(resume_path, cfg, unet, text_encoder, optimizer, lr_scheduler, accelerator)
        print0(f"resumed from {resume_path} at step {start_step}")
    # from here each process draws its own noise, timesteps and dropout: SEED + process index
    set_seed(cfg.SEED, device_specific=True)
    t_start = time.time()
    steps = train(cfg, accelerator, unet, text_encoder, train_models, optimizer, lr_scheduler, dataloader, noise_scheduler,
                  scaling_factor, max_steps, start_step, resume_rng, vae, argv, tokenizer)

    # --- 7. save and check ------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if main_process:
        save_and_check(cfg, accelerator, unet, text_encoder if text_encoder_trains(cfg) else None, vae_scale, steps,
                       len(images), t_start)

    # --- 8. load base + LoRA as a user would, and generate -----------------------------------
    # drop the trained models first (accelerate holds references too): one UNet in memory, not two
    del unet, vae, text_encoder, train_models, optimizer, dataloader, dataset, lora_params
    accelerator.free_memory()
    accelerator.wait_for_everyone()
    if main_process:
        generate(cfg, accelerator, weight_dtype)
        print0(f"whole run: {peak_memory_text(accelerator, 'rendering')}")
    accelerator.end_training()


OOM_HELP = ("out of GPU memory — lower BATCH_SIZE (and raise GRADIENT_ACCUMULATION_STEPS to keep the effective batch), "
            "set --GRADIENT_CHECKPOINTING=True, lower RESOLUTION, keep CACHE_LATENTS=True, or use --MIXED_PRECISION=bf16/fp16 "
            "(8-bit Adam does not help: a LoRA's whole optimizer state is a few MB); checkpoints already written are kept")

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
