"""
DreamBooth-LoRA: one subject from a few pictures, with prior preservation and pivotal tuning.

Built from lora_complete_example.py's functions; its main() is that script's main() plus what
DreamBooth adds (diff the two to see exactly what): every picture trains with one prompt naming the
subject (Ruiz et al. 2023, Sec. 3.2), the base model's own pictures of the subject's class train
beside them so the class keeps its look (prior preservation, Sec. 3.3), and optionally a new token's
embedding is learned together with the LoRA (pivotal tuning).

Usage (every constant of both scripts can be overridden as --NAME=value):

    # offline demo on a CPU, about a minute: a subject learned with and without prior preservation
    python lora_dreambooth_example.py --DEMO=True

    # your subject: a folder of a few pictures of it (captions not needed)
    python lora_dreambooth_example.py --DATA_DIR=./my_dog --INSTANCE_PROMPT="a photo of <zwx> dog" \\
        --CLASS_PROMPT="a photo of a dog" --NEW_TOKEN="<zwx>" \\
        --VALIDATION_PROMPTS="a photo of <zwx> dog, in a bucket"

A plain text for VALIDATION_PROMPTS is one prompt, commas and all (--VALIDATION_PROMPTS="a dog, in a bucket");
several are a Python list (--VALIDATION_PROMPTS="['a dog, in a bucket', 'a cat']").

Writes what lora_complete_example.py writes, and with NEW_TOKEN also <OUTPUT_NAME>_emb.safetensors (the
token's embedding, for load_textual_inversion and WebUI/ComfyUI's embeddings folder), with CLASS_PROMPT
the class pictures in CLASS_DATA_DIR (default OUTPUT_DIR/class_images).
"""
import json
import logging
import os
import sys
import time

import torch
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from diffusers.training_utils import cast_training_params
from peft import TrainableTokensConfig, inject_adapter_in_model
from safetensors.torch import load_file

import lora_complete_example as lce
from lora_complete_example import print0
from lora_tools.checks import check_dreambooth
from lora_tools.config import UserError
from lora_tools.dreambooth import PairedImages, class_images, expand_token, save_embedding, token_names
from lora_tools.machine import free_memory

# =============================================================================
# 1. Configuration: lora_complete_example.py's settings, and these
# =============================================================================
INSTANCE_PROMPT = None  # e.g. "a photo of <zwx> dog": every training picture's prompt; None = their captions
CLASS_PROMPT = None  # e.g. "a photo of a dog": prior preservation on the base's class pictures; None = off
CLASS_DATA_DIR = None  # the class pictures: reused, else drawn by the base; None = OUTPUT_DIR/class_images
NUM_CLASS_IMAGES = 100  # class pictures (Ruiz et al. 2023: ~1000, "but less can be used"; diffusers: 200-300)
PRIOR_LOSS_WEIGHT = 1.0  # λ in loss = subject loss + λ·class loss (Ruiz et al. Eq. 2 use λ = 1)
NEW_TOKEN = None  # e.g. "<zwx>": a new token, its embedding learned with the LoRA (pivotal tuning); or None
NUM_NEW_TOKEN_VECTORS = 2  # embedding vectors the token stands for (diffusers names them <zwx>, <zwx>_1, ...)
NEW_TOKEN_INIT_WORD = None  # the vectors start as this word's (a coarse descriptor: "dog"); None = "object"
EMBEDDING_LEARNING_RATE = 5e-4  # AdamW step size for the token's vectors (cloneofsimo/lora's example: 5e-4)

OWN_KEYS = [k for k in list(globals()) if k.isupper() and k not in lce.CONFIG_KEYS]  # the settings just above
CONFIG_KEYS = lce.CONFIG_KEYS + OWN_KEYS
DEFAULTS = {k: getattr(lce, k) for k in lce.CONFIG_KEYS} | {k: globals()[k] for k in OWN_KEYS}

# DEMO=True: the subject is a purple circle (a colour the shapes model never saw), 5 pictures of it on white,
# "a zwx circle on a white background"; the class, "a circle on a white background", is drawn by the base
# model. It trains twice, without and with prior preservation, and judges both on prompts the LoRA never saw.
DEMO_SUBJECT = ("circle", "purple", "white")
DEMO_SETTINGS = dict(
    lce.DEMO_SETTINGS,
    DATA_DIR=os.path.join(lce.HERE, ".demo_cache", "zwx-circle"),
    INSTANCE_PROMPT="a zwx circle on a white background",
    CLASS_PROMPT="a circle on a white background",
    NUM_CLASS_IMAGES=16,
    MAX_TRAIN_STEPS=100,
    CHECKPOINTING_STEPS=None,
    VALIDATION_PROMPTS=["a zwx circle on a white background", "a zwx circle on a red background"],
)
SHAPE_SETTINGS = lce.SHAPE_SETTINGS + ("NEW_TOKEN", "NUM_NEW_TOKEN_VECTORS")


def resolve_config(argv):
    cfg = lce.resolve_config(argv, DEFAULTS, DEMO_SETTINGS)
    check_dreambooth(cfg.as_dict())
    return cfg


# =============================================================================
# 2. Data: the subject's pictures, and the class pictures
# =============================================================================
def collate_pairs(pairs):
    """A batch of (subject, class) pairs -> one batch of 2N examples: the N subject examples, then their N
    class examples (lce.collate: each example's seed stays a Python int)."""
    return lce.collate([p[0] for p in pairs] + [p[1] for p in pairs])


def subject_captions(cfg, captions):
    """DreamBooth (Ruiz et al. 2023, Sec. 3.2): every picture of the subject is "a [identifier] [class noun]",
    INSTANCE_PROMPT, whatever its caption. With NEW_TOKEN the captions must name the token, or it won't
    train."""
    if cfg.INSTANCE_PROMPT is not None:
        return [cfg.INSTANCE_PROMPT] * len(captions)
    if cfg.NEW_TOKEN is not None and not any(cfg.NEW_TOKEN in c for c in captions):
        raise UserError(f"NEW_TOKEN {cfg.NEW_TOKEN!r} appears in no caption, so it would never be trained "
                        f"— write it into the captions, or set --INSTANCE_PROMPT='a photo of "
                        f"{cfg.NEW_TOKEN} dog'")
    return captions


def class_image_paths(cfg, accelerator, family, dtype):
    """Prior preservation (Ruiz et al. 2023, Sec. 3.3): NUM_CLASS_IMAGES pictures of CLASS_PROMPT drawn by
    the frozen base model itself, once (image i from seed SEED + i); a rerun, or your own folder, reuses
    them."""
    folder = cfg.CLASS_DATA_DIR or os.path.join(cfg.OUTPUT_DIR, "class_images")
    make_pipeline = lambda: lce.load_pipeline(cfg, family, dtype).to(accelerator.device)  # noqa: E731
    draw = lambda pipe, seed: lce.render(pipe, cfg, [cfg.CLASS_PROMPT], [seed])[0]  # noqa: E731
    with accelerator.main_process_first():  # drawn once, by the main process; the others then find them there
        return class_images(folder, cfg.NUM_CLASS_IMAGES, make_pipeline, draw, cfg.CLASS_PROMPT, cfg.SEED,
                            show_progress=accelerator.is_local_main_process, log=print0)


# =============================================================================
# 4. Pivotal tuning: a new token, its embedding learned together with the LoRA
# =============================================================================
# Textual inversion (Gal et al. 2023, Eq. 2) learns a new word's embedding v* with the model frozen;
# pivotal tuning (named after Roich et al. 2021; for SD LoRAs cloneofsimo/lora, Dec 2022) learns it
# together with the LoRA. The token gets NUM_NEW_TOKEN_VECTORS rows of the embedding table; PEFT's
# trainable tokens train those rows only (a small (n, d) tensor swapped in at lookup), so every other
# row stays bit-identical and no 49408 x 768 gradient is ever made.
def add_new_token(tokenizer, text_encoder, cfg):
    """NEW_TOKEN -> n new tokenizer entries <t>, <t>_1, ... (diffusers' names), their embedding rows set
    to NEW_TOKEN_INIT_WORD's embedding. Unless TRAIN_TEXT_ENCODER (then add_lora makes them trainable
    with its LoRA), PEFT's trainable tokens are put on those rows now. Returns their token ids.
    (SDXL: once for each of its two tokenizers and embedding tables.)"""
    names = token_names(cfg.NEW_TOKEN, cfg.NUM_NEW_TOKEN_VECTORS)
    if tokenizer.add_tokens(names) != len(names):
        raise UserError(f"NEW_TOKEN {cfg.NEW_TOKEN!r} (or one of {names}) is already in the tokenizer — "
                        "pick a new string, e.g. '<zwx>'")
    ids = tokenizer.convert_tokens_to_ids(names)
    init_word = cfg.NEW_TOKEN_INIT_WORD or "object"
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids  # one token, or several (a rare word)
    rows = max(len(tokenizer), text_encoder.get_input_embeddings().num_embeddings)  # (a padded table: kept)
    text_encoder.resize_token_embeddings(rows, mean_resizing=False)  # a new, larger table: frozen again below
    table = text_encoder.get_input_embeddings().weight  # (vocab + n, d)
    table.requires_grad_(False)
    with torch.no_grad():  # Gal et al. 2023, Sec. 3: start from a coarse descriptor of the concept
        table[ids] = table[init_ids].float().mean(0).to(table.dtype)
    if not cfg.TRAIN_TEXT_ENCODER:
        inject_adapter_in_model(TrainableTokensConfig(target_modules=["token_embedding"], token_indices=ids),
                                text_encoder, adapter_name="default")
        cast_training_params(text_encoder, dtype=torch.float32)
    print0(f"pivotal tuning: {cfg.NEW_TOKEN!r} = {' '.join(names)} (token ids {ids}), {len(ids)} x "
           f"{table.shape[1]} numbers starting as the embedding of {init_word!r}, learned at "
           f"EMBEDDING_LEARNING_RATE={cfg.EMBEDDING_LEARNING_RATE:g}")
    return ids


def new_token_vectors(text_encoder):
    """The new token's learned rows (n, d): PEFT's trainable_tokens_delta (despite its name, the rows)."""
    return next(p for n, p in text_encoder.named_parameters() if "trainable_tokens_delta" in n)


def encoder_prompts(cfg, prompts):
    """Prompts as the text encoder must see them: NEW_TOKEN stands for all its n vectors (what diffusers'
    maybe_convert_prompt does at inference once load_textual_inversion has added them)."""
    if not cfg.NEW_TOKEN:
        return list(prompts)
    return [expand_token(p, cfg.NEW_TOKEN, cfg.NUM_NEW_TOKEN_VECTORS) for p in prompts]


def embedding_name(cfg):
    return f"{cfg.OUTPUT_NAME}_emb.safetensors"


def embedding_tensors(family, text_encoders):
    """The embedding file's tensors: {"emb_params": (n, d)} for SD 1.x, {"clip_l": ..., "clip_g": ...} for
    SDXL (each text encoder's rows)."""
    return {name: new_token_vectors(te) for name, te in zip(family.embedding_names, text_encoders)}


class DreamBoothRun(lce.Run):
    """A run whose usable files (at every checkpoint) include the new token's embedding."""

    def adapter_files(self, dtype=torch.float32):
        files = super().adapter_files(dtype)
        if self.cfg.NEW_TOKEN:  # what load_textual_inversion and WebUI/ComfyUI read
            models = self.models()
            text_encoders = [models[te] for _, te in self.sd.family.text_parts]
            tensors = {k: v.detach().to("cpu", dtype).contiguous()
                       for k, v in embedding_tensors(self.sd.family, text_encoders).items()}
            files[embedding_name(self.cfg)] = (tensors, {"format": "pt"})
        return files


# =============================================================================
# 8. Load base + LoRA (+ the token) as any user would
# =============================================================================
def load_pipeline_with_lora(cfg, family, weights_dir, dtype):
    """lce.load_pipeline_with_lora + load_textual_inversion with NEW_TOKEN (SDXL: once per text encoder):
    plain diffusers, none of ours."""
    pipe = lce.load_pipeline_with_lora(cfg, family, weights_dir, dtype)
    if cfg.NEW_TOKEN:  # adds <t>, <t>_1, ... to the tokenizer; pipe(prompt) then expands <t> into all of them
        # transformers announces how it fills the new rows, which diffusers then overwrites: drop that line
        no_resize_notice = lambda record: "mean_resizing" not in record.getMessage()  # noqa: E731
        logger = logging.getLogger("transformers.modeling_utils")
        logger.addFilter(no_resize_notice)
        path = os.path.join(weights_dir, embedding_name(cfg))
        try:
            if len(family.text_parts) == 1:
                pipe.load_textual_inversion(path, token=cfg.NEW_TOKEN)
            else:  # one tensor per text encoder, each into its own tokenizer and table
                tensors = load_file(path)
                for name, (tok, te) in zip(family.embedding_names, family.text_parts):
                    pipe.load_textual_inversion(tensors[name], token=cfg.NEW_TOKEN,
                                                tokenizer=getattr(pipe, tok), text_encoder=getattr(pipe, te))
        finally:
            logger.removeFilter(no_resize_notice)
    return pipe


def recipe_lines(cfg, family):
    if not cfg.NEW_TOKEN:
        return []
    path = os.path.join(cfg.OUTPUT_DIR, embedding_name(cfg))
    if len(family.text_parts) == 1:
        return [f"pipe.load_textual_inversion({path!r}, token={cfg.NEW_TOKEN!r})"]
    lines = [f"from safetensors.torch import load_file; emb = load_file({path!r})"]
    for name, (tok, te) in zip(family.embedding_names, family.text_parts):
        lines.append(f"pipe.load_textual_inversion(emb[{name!r}], token={cfg.NEW_TOKEN!r}, "
                     f"tokenizer=pipe.{tok}, text_encoder=pipe.{te})")
    return lines


# =============================================================================
# The run: lora_complete_example.py's sections 1-8, with DreamBooth's additions
# =============================================================================
def main(argv):
    # --- 1. configuration, checked before anything slow -----------------------------
    cfg, accelerator, weight_dtype, family = lce.start(resolve_config(argv))
    resume_path = lce.resume_point(cfg, accelerator, SHAPE_SETTINGS)  # None: a new run, in its own folder

    # --- 2. data: listed and decoded once, so a bad folder fails before any download -----
    images, captions = lce.load_captioned_images(cfg, show_progress=accelerator.is_local_main_process,
                                                 captions_needed=cfg.INSTANCE_PROMPT is None)
    captions = subject_captions(cfg, captions)  # INSTANCE_PROMPT, when set, replaces every caption
    # prior preservation: the base model's own pictures of the class, drawn once
    class_paths = class_image_paths(cfg, accelerator, family, weight_dtype) if cfg.CLASS_PROMPT else None

    # --- 3. load and freeze -----------------------------------------------------------
    set_seed(cfg.SEED)  # the same on every process, so every process starts from the same LoRA
    sd = lce.load_models(cfg, family, weight_dtype)
    lce.freeze(sd.unet, sd.vae, *sd.text_encoders)
    base_params = lce.count_params(sd.unet)
    for m in (sd.unet, sd.vae, *sd.text_encoders):
        m.to(accelerator.device)

    # --- 4. add LoRA, and the new token (pivotal tuning) --------------------------------
    trainable = lce.add_lora(sd.unet, cfg, cfg.TARGET_MODULES)
    for tok, te in zip(sd.tokenizers, sd.text_encoders):  # (SDXL: the token in both embedding tables)
        token_ids = add_new_token(tok, te, cfg) if cfg.NEW_TOKEN else None
        if cfg.TRAIN_TEXT_ENCODER:  # the text encoder's LoRA also trains the token's rows
            rows = {"trainable_token_indices": {"token_embedding": token_ids}} if token_ids else {}
            trainable += lce.add_lora(te, cfg, cfg.TEXT_ENCODER_TARGET_MODULES, "TEXT_ENCODER_TARGET_MODULES",
                                      **rows)
    lce.describe_lora(cfg, trainable, base_params)
    if cfg.GRADIENT_CHECKPOINTING:
        sd.unet.enable_gradient_checkpointing()

    # --- 5. encode the data once: the subject's pictures, and the class pictures ---------
    empty_ids = lce.tokenize(sd.tokenizers, [""])[0]  # (CAPTION_DROPOUT)
    ids = lce.tokenize(sd.tokenizers, encoder_prompts(cfg, captions))
    dataset = lce.CaptionedImages(images, ids, cfg, empty_ids)
    if class_paths:
        class_ids = lce.tokenize(sd.tokenizers, [cfg.CLASS_PROMPT] * len(class_paths))
        class_dataset = lce.CaptionedImages(class_paths, class_ids, cfg, empty_ids)
    if cfg.CACHE_LATENTS:
        if cfg.NEW_TOKEN:
            print0(f"note: only latents are cached: a prompt holding {cfg.NEW_TOKEN!r} has no fixed text "
                   "embedding to cache (its vectors change every step): the text encoder runs at every step")
        dataset = lce.cache_latents(dataset, sd, cfg, show_progress=accelerator.is_local_main_process)
        if class_paths:
            class_dataset = lce.cache_latents(class_dataset, sd, cfg,
                                              show_progress=accelerator.is_local_main_process)
        sd.vae = None  # done with the frozen encoders: free their memory for the UNet
        if not lce.text_encoder_trains(sd):
            sd.text_encoders = tuple(None for _ in sd.text_encoders)
        free_memory()
        print0(lce.peak_memory_text(accelerator, "loading and caching"))
    if class_paths:  # each item: a subject example and a class example, weighted as Eq. (2) wants
        dataset = PairedImages(dataset, class_dataset, cfg.PRIOR_LOSS_WEIGHT)

    # --- 6. train -------------------------------------------------------------------------
    models = [(sd.unet, cfg.LEARNING_RATE)]
    if cfg.TRAIN_TEXT_ENCODER:
        models += [(te, cfg.TEXT_ENCODER_LEARNING_RATE or cfg.LEARNING_RATE) for te in sd.text_encoders]
    groups = lce.lora_param_groups(models, cfg)
    if cfg.NEW_TOKEN:  # no weight decay on the token: it would pull the vectors towards 0, not to any word
        groups.append({"params": [new_token_vectors(te) for te in sd.text_encoders],
                       "lr": cfg.EMBEDDING_LEARNING_RATE, "weight_decay": 0.0})
    command = (os.path.basename(__file__), *argv)
    run = lce.prepare_run(cfg, accelerator, sd, dataset, groups, command, run_class=DreamBoothRun,
                          collate_fn=collate_pairs if class_paths else lce.collate)
    if class_paths:
        lce.describe_run(run, f"{len(images)} subject + {len(class_paths)} class images "
                              f"({cfg.BATCH_SIZE} of each a batch)")
    else:
        lce.describe_run(run, f"{len(images)} images")
    start_step, resume_rng = 0, None
    if resume_path is not None:
        start_step, resume_rng = lce.restore_checkpoint(run, resume_path)
        print0(f"resumed from {resume_path} at step {start_step}")
    # from here each process draws its own dropout masks (the noise is each example's own: EpochShuffle)
    set_seed(cfg.SEED, device_specific=True)
    t_start = time.time()
    lce.train(run, start_step, resume_rng)

    # --- 7. save and check, and the token's embedding ---------------------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        lce.save_and_check(run, len(images), t_start)
        if cfg.NEW_TOKEN:  # the textual-inversion file: {"emb_params": (n, d)}, SDXL {"clip_l", "clip_g"}
            emb_path = os.path.join(cfg.OUTPUT_DIR, embedding_name(cfg))
            models = run.models()
            tensors = embedding_tensors(family, [models[te] for _, te in family.text_parts])
            save_embedding(emb_path, tensors, lce.SAVE_DTYPES[cfg.SAVE_DTYPE])
            print0(f"saved the embedding of {cfg.NEW_TOKEN!r} ({cfg.NUM_NEW_TOKEN_VECTORS} vectors a text "
                   f"encoder) to {emb_path}")

    # --- 8. load base + LoRA (+ token) as a user would, and generate -------------------------
    del run, sd, dataset, models, trainable
    accelerator.free_memory()
    free_memory()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        pipe = load_pipeline_with_lora(cfg, family, cfg.OUTPUT_DIR, weight_dtype).to(accelerator.device)
        # comparison.png: the subject's prompt and the class prompt too (does the class still look as it did?)
        subject = [p for p in (cfg.INSTANCE_PROMPT, cfg.CLASS_PROMPT) if p]
        prompts = list(dict.fromkeys(subject + list(cfg.VALIDATION_PROMPTS)))
        lines = recipe_lines(cfg, family)
        recipe = lce.reproduce_recipe(cfg, family, weight_dtype, accelerator.device, lines)
        lce.generate(cfg, pipe, prompts, recipe)
        del pipe
        if cfg.SAVE_MERGED_MODEL:
            folder = os.path.join(cfg.OUTPUT_DIR, "merged_pipeline")
            lce.merge_and_save(load_pipeline_with_lora(cfg, family, cfg.OUTPUT_DIR, torch.float32), folder,
                               lce.SAVE_DTYPES[cfg.SAVE_DTYPE])
            print0(f"merged pipeline (LoRA fused, {cfg.SAVE_DTYPE}; with the token): {folder}")
        print0(f"{lce.peak_memory_text(accelerator, 'saving and rendering')}; "
               f"whole run: {max(lce.PHASE_PEAKS.values()) / 2**30:.2f} GB")
    accelerator.end_training()


# =============================================================================
# DEMO=True: the subject learned without and with prior preservation, judged on prompts never trained on
# =============================================================================
def demo(argv):
    """Two runs of main() (OUTPUT_DIR/without_prior, OUTPUT_DIR/with_prior, the same seed), then the
    judge of lora_tools/shapes.py on both LoRAs: how often the subject is drawn (purple) for its own
    prompt on backgrounds it was never shown on, and how often purple leaks into the class prompt and
    into base-world prompts that do not ask for it."""
    from lora_tools.shapes import build_subject_dataset, subject_report  # the demo's pictures and judge

    cfg = resolve_config(argv)
    build_subject_dataset(DEMO_SETTINGS["DATA_DIR"], DEMO_SUBJECT)
    given = [a for a in argv if not a.startswith(("--OUTPUT_DIR=", "--CLASS_PROMPT="))]
    outputs = {"without prior": os.path.join(cfg.OUTPUT_DIR, "without_prior"),
               "with prior": os.path.join(cfg.OUTPUT_DIR, "with_prior")}
    class_dir = [f"--CLASS_DATA_DIR={cfg.CLASS_DATA_DIR or os.path.join(cfg.OUTPUT_DIR, 'class_images')}"]
    for name, out in outputs.items():
        print0(f"\n=== DreamBooth demo: {name} preservation -> {out}")
        prior = class_dir if name == "with prior" else ["--CLASS_PROMPT=None"]
        main(given + prior + [f"--OUTPUT_DIR={out}"])
        AcceleratorState._reset_state(True)  # a second run in this process: a fresh Accelerator
        GradientState._reset_state()
    family = lce.detect(cfg.MODEL_ID)
    pipes = {name: load_pipeline_with_lora(cfg, family, out, torch.float32) for name, out in outputs.items()}
    scores = subject_report(pipes, DEMO_SUBJECT, seeds=[0, 1, 2, 3], steps=cfg.NUM_INFERENCE_STEPS,
                            guidance_scale=cfg.GUIDANCE_SCALE, log=print0)
    with open(os.path.join(cfg.OUTPUT_DIR, "dreambooth_scores.json"), "w") as f:
        json.dump(scores, f, indent=1)


if __name__ == "__main__":
    wants_demo = any(a == "--DEMO=True" for a in sys.argv[1:])
    lce.run_from_command_line(demo if wants_demo else main, __doc__, CONFIG_KEYS, DEFAULTS)
