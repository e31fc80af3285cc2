"""Resumable checkpoints: OUTPUT_DIR/checkpoint-<step>/, written and read back by this module only.

    checkpoint-<step>/
      training_state.pt                  the checkpoint dict below: everything an exact continuation needs
      pytorch_lora_weights.safetensors   the LoRA at this step, a usable file (diffusers' format)
      <other usable files>               what the run adds (the DreamBooth script: the new token's embedding)
      training_config.json               the settings of the run that wrote it

    checkpoint = {
        "step":         optimizer steps done,
        "trainable":    {"unet.<parameter name>": tensor, ...}, every trained tensor, fp32, by name,
        "optimizer":    the optimizer's state_dict (AdamW's two moments per tensor),
        "lr_scheduler": the schedule's state_dict,
        "scaler":       the fp16 loss scaler's state_dict, or None,
        "rng":          [process 0's random-number states, process 1's, ...],
    }

A checkpoint folder is written under a temporary name and renamed when complete, so a crash
mid-write never leaves a half checkpoint that "latest" would pick. Everything is loaded without
unpickling code: safetensors for the usable files, torch.load(weights_only=True) for the state.
"""
import json
import os
import random
import re
import shutil
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file

from .config import UserError

STATE_NAME = "training_state.pt"
CONFIG_NAME = "training_config.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def rng_states():
    """Every random number generator a training step of this process draws from (each process of a
    multi-GPU run has its own: its CPU generator and its own GPU's)."""
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), np_state[2], np_state[3], np_state[4]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,  # this process's GPU only
    }


def set_rng_states(s):
    random.setstate((3, tuple(s["python"]), s["python_gauss"]))
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def list_checkpoints(folder):
    """[(step, path)] of the complete checkpoints in `folder`, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        m = CHECKPOINT_RE.match(name)
        path = os.path.join(folder, name)
        if m and os.path.isfile(os.path.join(path, STATE_NAME)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def resolve_resume(resume_from, output_dir):
    """RESUME_FROM -> a checkpoint folder, or None for a fresh start."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    if not os.path.isfile(os.path.join(resume_from, STATE_NAME)):
        raise UserError(f"RESUME_FROM={resume_from!r} is not a checkpoint folder (no {STATE_NAME} in it) — "
                        f"pass a checkpoint-<step> folder, or --RESUME_FROM=latest")
    return resume_from


# What a run writes into OUTPUT_DIR besides its checkpoints (<OUTPUT_NAME>.safetensors and _emb too).
RUN_FILES = ("pytorch_lora_weights.safetensors", CONFIG_NAME, "metrics.jsonl", "loss_curve.png", "rank_spectrum.png",
             "comparison.png", "test_generation.png", "concept_scores.json", "dreambooth_scores.json")
RUN_FOLDERS = ("validation", "merged_pipeline", "logs")  # (class_images/ stays: a DreamBooth run reuses it)


def earlier_run(output_dir):
    """What another run left in output_dir that is worth keeping: ([its weights and checkpoints], its
    settings, {} when unknown); ([], {}) when there is nothing (a metrics.jsonl alone holds no weights)."""
    checkpoints = list_checkpoints(output_dir)
    found = [name for name in ("pytorch_lora_weights.safetensors", CONFIG_NAME)
             if os.path.isfile(os.path.join(output_dir, name))] + [os.path.basename(p) for _, p in checkpoints]
    settings = {}
    for folder in [output_dir] + [p for _, p in checkpoints[::-1]]:
        if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            settings = checkpoint_config(folder)
            break
    return found, settings


def claim_output_dir(output_dir, resume_path, overwrite, is_main, log=print):
    """A run's OUTPUT_DIR is its own. A new run into a folder holding another run's weights stops here,
    before any slow work (one line naming the three ways on), unless the earlier run was a demo (re-running
    the demo must cost nothing) or OVERWRITE_OUTPUT_DIR=True: then the earlier run's files and checkpoints
    go first, so that neither RESUME_FROM=latest nor CHECKPOINTS_TOTAL_LIMIT ever mixes them with this
    run's. Resuming a checkpoint of this folder continues the run it belongs to."""
    found, settings = earlier_run(output_dir)
    if not found or resume_path is not None and os.path.samefile(os.path.dirname(os.path.abspath(resume_path)),
                                                                  output_dir):
        return
    if not (overwrite or settings.get("DEMO")):
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise UserError(f"OUTPUT_DIR={output_dir!r} holds another run's results ({shown}) — continue that run with "
                        f"--RESUME_FROM=latest, write this one to a new --OUTPUT_DIR, or replace them with "
                        f"--OVERWRITE_OUTPUT_DIR=True")
    if is_main:
        log(f"replacing the earlier {'demo ' * bool(settings.get('DEMO'))}run's results in {output_dir}")
        name = settings.get("OUTPUT_NAME")
        files = RUN_FILES + ((f"{name}.safetensors", f"{name}_emb.safetensors") if name else ())
        for f in files:
            if os.path.isfile(os.path.join(output_dir, f)):
                os.remove(os.path.join(output_dir, f))
        for folder in RUN_FOLDERS + tuple(os.path.basename(p) for _, p in list_checkpoints(output_dir)):
            shutil.rmtree(os.path.join(output_dir, folder), ignore_errors=True)


def checkpoint_config(path):
    """The settings of the run that wrote checkpoint `path` (a dict)."""
    with open(os.path.join(path, CONFIG_NAME)) as f:
        return json.load(f)


def save_checkpoint(output_dir, checkpoint, files, config_json, limit=None):
    """Write checkpoint-<step>/ atomically: the checkpoint dict, the usable `files` ({file name:
    (tensors, safetensors metadata)}) and the config; then keep only the newest `limit` checkpoints."""
    final = os.path.join(output_dir, f"checkpoint-{checkpoint['step']}")
    tmp = tempfile.mkdtemp(dir=output_dir, prefix=f".checkpoint-{checkpoint['step']}-")
    try:
        for name, (tensors, metadata) in files.items():
            save_file(tensors, os.path.join(tmp, name), metadata=metadata)
        torch.save(checkpoint, os.path.join(tmp, STATE_NAME))
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            f.write(config_json + "\n")
        if os.path.isdir(final):  # the same step again (a re-run): swap, never a moment without one
            old = final + ".old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if limit is not None:
        for _, path in list_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path):
    """The checkpoint dict of checkpoint folder `path` (tensors on the CPU)."""
    return torch.load(os.path.join(path, STATE_NAME), map_location="cpu", weights_only=True)


@torch.no_grad()
def restore_trainable(models, trainable, path):
    """Put the checkpoint's trained tensors into `models` ({component name: model}), each by its name."""
    params = {f"{name}.{n}": p for name, model in models.items() for n, p in model.named_parameters() if p.requires_grad}
    if params.keys() != trainable.keys():
        missing, unexpected = sorted(params.keys() - trainable.keys()), sorted(trainable.keys() - params.keys())
        raise UserError(f"{path} does not match this model: "
                        + (f"it lacks {missing[0]}" if missing else f"it holds {unexpected[0]}, which this model lacks")
                        + " — resume with the settings it was trained with")
    for name, p in params.items():
        p.copy_(trainable[name])
