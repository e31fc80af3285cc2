"""
Put the comparison pictures of several training runs side by side, one labelled row per run.

Each run folder is an OUTPUT_DIR of lora_complete_example.py; its comparison.png shows the same
VALIDATION_PROMPTS and seed without and with that run's LoRA. Runs that differ in one setting
(the rank, say) then read as an ablation:

    for r in 2 4 8; do
        python lora_complete_example.py --LORA_RANK=$r --LORA_ALPHA=$r --OUTPUT_DIR=runs/rank$r
    done
    python compare_runs.py runs/rank2 runs/rank4 runs/rank8 --OUT=runs/ranks.png

Each row is labelled with the settings in which the runs differ (from their training_config.json)
and the size of their LoRA file.
"""
import json
import os
import sys

from PIL import Image

from lora_tools.config import UserError
from lora_tools.pictures import image_grid


def load_run(folder):
    paths = {name: os.path.join(folder, name) for name in ("comparison.png", "training_config.json", "pytorch_lora_weights.safetensors")}
    missing = [name for name, p in paths.items() if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{folder!r} is not a finished run folder (missing {', '.join(missing)}) — pass OUTPUT_DIRs of completed runs")
    with open(paths["training_config.json"]) as f:
        config = json.load(f)
    image = Image.open(paths["comparison.png"]).convert("RGB")
    return config, image, os.path.getsize(paths["pytorch_lora_weights.safetensors"])


def row_labels(configs, sizes):
    """The settings that differ between runs (OUTPUT_DIR aside), plus each LoRA file's size."""
    keys = sorted(k for k in configs[0] if k != "OUTPUT_DIR" and len({json.dumps(c.get(k)) for c in configs}) > 1)
    return [", ".join(f"{k}={c.get(k)}" for k in keys) + f" ({size / 1e6:.2f} MB)" for c, size in zip(configs, sizes)]


def main(argv):
    out = "runs_comparison.png"
    folders = []
    for arg in argv:
        if arg.startswith("--OUT="):
            out = arg.split("=", 1)[1]
        elif arg.startswith("--"):
            raise UserError(f"unknown option {arg!r} — usage: python compare_runs.py RUN_DIR [RUN_DIR ...] [--OUT=file.png]")
        else:
            folders.append(arg)
    if len(folders) < 2:
        raise UserError("give at least two run folders — usage: python compare_runs.py RUN_DIR RUN_DIR [...] [--OUT=file.png]")
    runs = [load_run(f) for f in folders]
    configs, images, sizes = zip(*runs)
    if len({im.size for im in images}) > 1:
        raise UserError("the runs' comparison.png differ in size: compare runs made with the same RESOLUTION and VALIDATION_PROMPTS")
    sheet = image_grid(list(images), rows=len(images), row_labels=row_labels(list(configs), list(sizes)))
    sheet.save(out)
    print(f"wrote {out}: {len(images)} runs, one row each")
    return out


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
