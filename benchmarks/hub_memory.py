"""
Does a run's memory grow with the number of images in a hub dataset? (DATASET_NAME, the default data path)

Writes hub-style datasets (data/train-*.parquet, PNG bytes, an image and a text column) of N pictures of
1024 x 1024 px each, then runs the script on each through `datasets.load_dataset`, offline, on the demo's
small base model (demo_base/, so that the model's own memory is small and the data's shows), at 64 px, one
training step, and reads the whole run's peak memory from what it prints. Each run is its own process.

    python benchmarks/hub_memory.py                      # 300 and 1,200 images
    python benchmarks/hub_memory.py --SIZES=300,1200,2400

A decoded 1024² RGB picture is 3 MiB: a run that kept every decoded picture would grow by about 3 GiB
per 1,000 images. The datasets (a few MB each: the pictures compress well) go to a temporary folder.
"""
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = [300, 1200]  # images per dataset
SIDE = 1024  # pixels per side of each picture


def write_dataset(folder, n):
    import io

    import datasets
    from datasets import Dataset, Features, Value

    import random

    from lora_tools.shapes import COLOURS, SHAPES, draw

    colours = list(COLOURS)
    rows = {"image": [], "text": []}
    for i in range(n):
        colour, background = colours[i % len(colours)], colours[(i + 1) % len(colours)]
        shape = SHAPES[i % len(SHAPES)]
        buf = io.BytesIO()
        draw(shape, colour, background, rng=random.Random(i), size=SIDE).save(buf, format="PNG")
        rows["image"].append({"bytes": buf.getvalue(), "path": None})
        rows["text"].append(f"a {colour} {shape} on a {background} background")
    os.makedirs(os.path.join(folder, "data"))
    features = Features({"image": datasets.Image(), "text": Value("string")})
    Dataset.from_dict(rows, features=features).to_parquet(os.path.join(folder, "data", "train-00000-of-00001.parquet"))


def peak_of_run(dataset, out, cache):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=cache, CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, os.path.join(ROOT, "lora_complete_example.py"), f"--MODEL_ID={os.path.join(ROOT, 'demo_base')}",
           "--DATA_DIR=None", f"--DATASET_NAME={dataset}", "--RESOLUTION=64", "--MAX_TRAIN_STEPS=1", "--BATCH_SIZE=8",
           "--GRADIENT_ACCUMULATION_STEPS=1", "--NUM_INFERENCE_STEPS=2", "--NUM_VALIDATION_SEEDS=1",
           "--VALIDATION_PROMPTS=a red circle on a blue background", f"--OUTPUT_DIR={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"the run failed:\n{r.stderr[-3000:]}")
    found = re.findall(r"whole run: ([\d.]+) GB", r.stdout)
    cached = re.findall(r"(\d+) images at 64px", r.stdout)
    return float(found[-1]), int(cached[-1])


def main(argv):
    from lora_tools.config import parse_overrides

    sizes = parse_overrides(argv, {"SIZES": SIZES})["SIZES"]
    print(f"{'images':>7} {'trained on':>10} {'whole-run peak RSS':>20}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            folder = os.path.join(tmp, f"hub{n}")
            write_dataset(folder, int(n))
            peak, trained = peak_of_run(folder, os.path.join(tmp, f"out{n}"), os.path.join(tmp, "cache"))
            results.append((int(n), peak))
            print(f"{int(n):>7} {trained:>10} {peak:>17.2f} GB", flush=True)
    (n0, p0), (n1, p1) = results[0], results[-1]
    print(f"{n1:,} images vs {n0:,}: peak x{p1 / p0:.2f} (keeping every decoded picture would add "
          f"{(n1 - n0) * SIDE * SIDE * 3 / 2**30:.1f} GB)")


if __name__ == "__main__":
    main(sys.argv[1:])
