"""Acceptance points 9 and 10: the script run as a user runs it (a subprocess), on the demo and on
a model and data it has never seen, checked against plain diffusers."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import lora_complete_example as lce
from conftest import REPO_ROOT, SCRIPT, capture_library_messages, key_complaints, subprocess_env
from lora_tools.demo import build_tiny_pipeline, make_shape_image


def run_script(*args, timeout=600):
    r = subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO_ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:  # show the error, not the progress bars
        stderr = "\n".join(line for line in r.stderr.replace("\r", "\n").splitlines() if "it/s]" not in line and "s/it]" not in line)
        pytest.fail(f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{stderr[-5000:]}")
    return r


def expected_lora_shapes(unet, targets, rank):
    """From the UNet's own Linear layers, independent of PEFT: diffusers-format key -> shape."""
    shapes = {}
    for n, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets):
            shapes[f"unet.{n}.lora.down.weight"] = (rank, m.in_features)
            shapes[f"unet.{n}.lora.up.weight"] = (m.out_features, rank)
    return shapes


def file_shapes(path):
    with safe_open(path, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()


def render(model_dir, lora_dir, cfg):
    """What a user types: plain diffusers, base + LoRA, the settings of the run."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    messages = []
    if lora_dir is not None:
        with capture_library_messages() as messages:
            pipe.load_lora_weights(lora_dir)
    image = pipe(cfg.VALIDATION_PROMPT, height=cfg.RESOLUTION, width=cfg.RESOLUTION,
                 num_inference_steps=cfg.NUM_INFERENCE_STEPS, guidance_scale=cfg.GUIDANCE_SCALE,
                 generator=torch.Generator().manual_seed(cfg.SEED)).images[0]
    return pipe, np.asarray(image, dtype=np.int16), messages


# ----------------------------------------------------------------------------- 9. the demo
def test_demo_writes_the_weights_the_image_and_the_config(tmp_path):
    from diffusers import UNet2DConditionModel

    out = str(tmp_path / "demo-out")
    run_script("--DEMO=True", f"--OUTPUT_DIR={out}")
    cfg = lce.resolve_config(["--DEMO=True", f"--OUTPUT_DIR={out}"])

    # training_config.json is the resolved config
    with open(os.path.join(out, "training_config.json")) as f:
        assert json.load(f) == cfg.as_dict()

    # the weights: exactly one down/up pair per targeted Linear of the tiny UNet, at rank LORA_RANK
    unet = UNet2DConditionModel.from_pretrained(cfg.MODEL_ID, subfolder="unet")
    expected = expected_lora_shapes(unet, cfg.TARGET_MODULES, cfg.LORA_RANK)
    shapes, meta = file_shapes(os.path.join(out, lce.WEIGHTS_NAME))
    assert shapes == expected
    n_params = sum(a * b for a, b in shapes.values())
    lce.freeze(unet)
    assert n_params == sum(p.numel() for p in lce.add_lora(unet, cfg))
    assert len(shapes) == 160 and n_params == 15_104  # the tiny UNet: 40 projections, rank 4
    assert json.loads(meta["training_config"]) == cfg.as_dict()

    # the test image: RGB at the training resolution
    with Image.open(os.path.join(out, "test_generation.png")) as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (64, 64)
        pixels = np.asarray(img)
    assert pixels.std() > 0  # a rendered picture, not a blank canvas


# ----------------------------------------------------------------------------- 10. never-seen model + data
@pytest.fixture(scope="module")
def unseen_model_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("unseen")
    model = build_tiny_pipeline(str(root / "other-sd"), seed=7, prediction_type="v_prediction")
    data = root / "my_pictures"
    (data / "more").mkdir(parents=True)
    pictures = [  # (file, colour, shape, background, size, mode, caption)
        ("red_circle.png", "red", "circle", "blue", (96, 64), "RGB", "a red circle on a blue background"),
        ("green_square.jpg", "green", "square", "yellow", (64, 80), "RGB", "a green square on a yellow background"),
        ("yellow_circle.png", "yellow", "circle", "green", (70, 70), "RGBA", "a yellow circle on a green background"),
        ("grey.png", "blue", "square", "red", (128, 100), "L", "a grey square"),
        ("more/palette.png", "blue", "circle", "yellow", (90, 72), "P", "a blue circle on a yellow background"),
        ("more/red_square.webp", "red", "square", "green", (80, 80), "RGB", "a red square on a green background"),
    ]
    for i, (name, colour, shape, background, size, mode, caption) in enumerate(pictures):
        img = make_shape_image(colour, shape, background, size=size, jitter=i - 3).convert(mode)
        img.save(data / name)
        (data / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    (data / "notes.md").write_text("not an image")
    return model, str(data), len(pictures)


def test_unseen_model_and_data_end_to_end_match_plain_diffusers(unseen_model_and_data, tmp_path):
    from diffusers import DDIMScheduler

    model, data, n_images = unseen_model_and_data
    assert DDIMScheduler.from_pretrained(model, subfolder="scheduler").config.prediction_type == "v_prediction"
    out = str(tmp_path / "lora-out")
    argv = [f"--MODEL_ID={model}", f"--DATA_DIR={data}", "--MIXED_PRECISION=no", f"--OUTPUT_DIR={out}",
            "--MAX_TRAIN_STEPS=6", "--RESOLUTION=64", "--NUM_INFERENCE_STEPS=5", "--BATCH_SIZE=3",
            "--GRADIENT_ACCUMULATION_STEPS=1", "--LEARNING_RATE=1e-2", "--LORA_RANK=2", "--LORA_ALPHA=2",
            "--TARGET_MODULES=to_q,to_v,to_out.0", "--SEED=123", "--GUIDANCE_SCALE=5.0",
            "--VALIDATION_PROMPT=a green square on a yellow background"]
    run_script(*argv)
    cfg = lce.resolve_config(argv)
    # all six pictures (grey, palette, alpha, JPEG, WebP, in a subfolder) with their .txt captions
    images, captions = lce.load_captioned_images(cfg)
    assert len(images) == n_images
    assert all(open(os.path.splitext(i)[0] + ".txt", encoding="utf-8").read().strip() == c
               for i, c in zip(images, captions))

    pipe, expected, messages = render(model, out, cfg)
    assert key_complaints(messages) == [], messages
    with Image.open(os.path.join(out, "test_generation.png")) as img:
        written = np.asarray(img.convert("RGB"), dtype=np.int16)
    assert written.shape == expected.shape == (64, 64, 3)
    assert np.abs(written - expected).max() <= 1

    # the adapter diffusers loaded is the one we trained: rank 2 on the three chosen projections
    lora_layers = {n: m for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "default_0" in m.lora_A}
    assert lora_layers and all(n.rsplit(".", 1)[-1] in ("to_q", "to_v") or n.endswith("to_out.0") for n in lora_layers)
    assert {m.lora_A["default_0"].out_features for m in lora_layers.values()} == {2}
    # and it matters: without it the same call renders a different picture
    _, base, _ = render(model, None, cfg)
    assert np.abs(written - base).max() > 1
