"""Resumable checkpoints: OUTPUT_DIR/checkpoint-<step>/ holds everything an exact continuation needs.

    checkpoint-<step>/
      pytorch_lora_weights.safetensors   the LoRA at this step: a usable file, diffusers' format
      <OUTPUT_NAME>_emb.safetensors      with NEW_TOKEN: the new token's embedding at this step
      training_state.pt                  optimizer, LR schedule, grad scaler, RNG states, position
      training_config.json               the settings of the run that wrote it

A checkpoint folder is written under a temporary name and renamed when complete, so a crash
mid-write never leaves a half checkpoint that "latest" would pick. Everything is loaded without
unpickling code: safetensors for weights, torch.load(weights_only=True) for the state.
"""
import json
import os
import random
import re
import shutil
import tempfile

import numpy as np
import torch

from .config import UserError

STATE_NAME = "training_state.pt"
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


def save_checkpoint(output_dir, step, write_weights, optimizer, lr_scheduler, scaler, rngs, position, config_json, limit=None):
    """Write checkpoint-<step>/ atomically, then keep only the newest `limit` checkpoints.
    write_weights(folder) writes the weight files into the new folder; rngs: the RNG states of every
    process, in process order (see rng_states)."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = tempfile.mkdtemp(dir=output_dir, prefix=f".checkpoint-{step}-")
    try:
        write_weights(tmp)
        state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "rng": rngs, "position": position}
        torch.save(state, os.path.join(tmp, STATE_NAME))
        with open(os.path.join(tmp, "training_config.json"), "w") as f:
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


def checkpoint_config(path):
    """The settings of the run that wrote checkpoint `path` (a dict)."""
    with open(os.path.join(path, "training_config.json")) as f:
        return json.load(f)


def load_checkpoint(path):
    """(LoRA tensors in diffusers' naming, training state, the run's config dict)."""
    from safetensors.torch import load_file

    lora = load_file(os.path.join(path, "pytorch_lora_weights.safetensors"))
    state = torch.load(os.path.join(path, STATE_NAME), map_location="cpu", weights_only=True)
    return lora, state, checkpoint_config(path)
