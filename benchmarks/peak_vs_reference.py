"""
A whole run's peak memory, side by side with diffusers' reference LoRA script.

Runs lora_complete_example.py and diffusers' examples/text_to_image/train_text_to_image_lora.py on
the same model, data, batch, resolution, rank and precision: the SD1.5 architecture with random
weights in a local folder in diffusers layout, IMAGES captioned pictures at RESOLUTION px (a
metadata.jsonl folder, which both read), batch 1, rank 4, STEPS optimizer steps, fp32 on the CPU,
and one test picture of 30 denoising steps at the end (the reference also renders one after its
epoch). Each run is its own process.

Peaks: our script prints its peak memory per phase (loading and caching, training, saving and
rendering) and the whole run's, the largest of them (on the CPU, Linux's resident-set high-water
mark, VmHWM, reset between phases). The reference prints none; its whole-run peak is the ru_maxrss
the kernel reports for the finished process (os.wait4), the same high-water mark over the whole
process.

    python benchmarks/peak_vs_reference.py --REFERENCE=path/to/train_text_to_image_lora.py

The reference is not shipped here: take it from a diffusers checkout of the installed version's era
(git clone https://github.com/huggingface/diffusers; examples/text_to_image/). The model folder
(4.3 GB of random weights) goes to a temporary folder.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# -----------------------------------------------------------------------------
REFERENCE = ""  # path to diffusers' examples/text_to_image/train_text_to_image_lora.py
IMAGES = 4  # captioned pictures in the data folder
RESOLUTION = 512  # pixels
STEPS = 2  # optimizer steps of batch 1
PROMPT = "a red circle on a blue background"  # the test picture's prompt
# -----------------------------------------------------------------------------


def write_model(folder):
    """The SD1.5 architecture with random weights, saved as a diffusers folder (PNDM, as SD1.5's)."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from lora_tools.sd15 import sd15_text_encoder, sd15_tokenizer, sd15_unet, sd15_vae

    torch.manual_seed(0)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=sd15_vae(), text_encoder=sd15_text_encoder(), tokenizer=sd15_tokenizer(),
                                   unet=sd15_unet(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


def write_data(folder, n, size):
    """n pictures of the demo's shapes world with captions, as a metadata.jsonl image folder."""
    import random

    from lora_tools.shapes import COLOURS, SHAPES, draw

    os.makedirs(folder)
    colours = list(COLOURS)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for i in range(n):
            colour, background, shape = colours[i % len(colours)], colours[(i + 1) % len(colours)], SHAPES[i % len(SHAPES)]
            draw(shape, colour, background, rng=random.Random(i), size=size).save(os.path.join(folder, f"{i}.png"))
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a {colour} {shape} on a {background} background"}) + "\n")


def run(cmd, env):
    """Run one training process; return its stdout and the kernel's ru_maxrss for it, in GB."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{os.path.basename(cmd[1])} failed:\n{out[-3000:]}")
    return out, usage.ru_maxrss * 1024 / 2**30  # Linux: KiB


def main(argv):
    from lora_tools.config import parse_overrides

    cfg = parse_overrides(argv, {k: v for k, v in globals().items() if k.isupper() and k != "ROOT"})
    if not os.path.isfile(cfg["REFERENCE"]):
        sys.exit("give --REFERENCE=path/to/train_text_to_image_lora.py (diffusers' examples/text_to_image/)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    res, steps = cfg["RESOLUTION"], cfg["STEPS"]
    with tempfile.TemporaryDirectory() as tmp:
        model, data = os.path.join(tmp, "sd15"), os.path.join(tmp, "data")
        write_model(model)
        write_data(data, cfg["IMAGES"], res)
        ours, ours_rss = run([sys.executable, os.path.join(ROOT, "lora_complete_example.py"), f"--MODEL_ID={model}",
                              f"--DATA_DIR={data}", f"--RESOLUTION={res}", "--BATCH_SIZE=1",
                              "--GRADIENT_ACCUMULATION_STEPS=1", f"--MAX_TRAIN_STEPS={steps}", "--RANDOM_FLIP=False",
                              "--LORA_RANK=4", "--LORA_ALPHA=4", "--SEED=0", "--NUM_VALIDATION_SEEDS=1",
                              f"--VALIDATION_PROMPTS={cfg['PROMPT']}", "--NUM_INFERENCE_STEPS=30",
                              "--CHECKPOINTING_STEPS=None", f"--OUTPUT_DIR={os.path.join(tmp, 'ours')}"], env)
        phases = re.findall(r"peak host memory \(RSS\) while ([a-z ]+): ([\d.]+) GB", ours)
        whole = float(re.findall(r"; whole run: ([\d.]+) GB", ours)[-1])
        _, reference = run([sys.executable, cfg["REFERENCE"], f"--pretrained_model_name_or_path={model}",
                            f"--train_data_dir={data}", f"--resolution={res}", "--center_crop", "--train_batch_size=1",
                            f"--max_train_steps={steps}", "--rank=4", "--learning_rate=1e-4", "--seed=0",
                            f"--validation_prompt={cfg['PROMPT']}", "--num_validation_images=1",
                            "--dataloader_num_workers=0", "--checkpointing_steps=100000",
                            f"--output_dir={os.path.join(tmp, 'reference')}"], env)
    print(f"SD1.5 architecture, {cfg['IMAGES']} pictures at {res} px, batch 1, rank 4, {steps} steps, fp32 on the CPU")
    for phase, gb in phases:
        print(f"  ours, peak while {phase:20} {float(gb):6.2f} GB")
    print(f"  ours, whole run {'':19} {whole:6.2f} GB   (the kernel's ru_maxrss after the last reset: {ours_rss:.2f} GB)")
    print(f"  reference, whole run {'':14} {reference:6.2f} GB")
    print(f"ours / reference, whole run: {whole / reference:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
