"""The script run as a user runs it (a subprocess): the demo, and a model and data it has never seen
(v-prediction, a UNet a hundred times the demo's, pictures of every kind), checked against plain
diffusers; its output is quiet (no warning echoes, no library noise) and its memory peak is the
training's: the trained models are freed before the test image is rendered."""
import json
import os
import re

import pytest
import torch
from safetensors import safe_open

import lora_complete_example as lce
from conftest import capture_library_messages, fresh_pipe, key_complaints, pixel_diff, png, render, run_script
from lora_tools.demo import build_tiny_pipeline, make_shape_image, tiny_unet_config

LIBRARY_NOISE = ("Already found a `peft_config` attribute", "No LoRA keys associated to CLIPTextModel")
WARNING_ECHO = re.compile(r"^\S+\.py:\d+: \w*Warning: ", re.M)  # what warnings.warn prints, a source line under it


@pytest.fixture(scope="module")
def unseen_model_and_data(tmp_path_factory):
    """Another tiny pipeline (seed 7, v-prediction) whose UNet has 40M parameters (150 MB in fp32,
    so that a second copy in memory shows), and six captioned pictures of every kind in two folders."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("unseen")
    model = build_tiny_pipeline(str(root / "other-sd"), seed=7, prediction_type="v_prediction")
    torch.manual_seed(7)
    UNet2DConditionModel(**dict(tiny_unet_config(), block_out_channels=(160, 160, 320, 320), norm_num_groups=32,
                                attention_head_dim=8)).save_pretrained(os.path.join(model, "unet"))
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
        make_shape_image(colour, shape, background, size=size, jitter=i - 3).convert(mode).save(data / name)
        (data / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    (data / "notes.md").write_text("not an image")
    return model, str(data), len(pictures)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, unseen_model_and_data):
    """The demo (10 steps instead of its 150) and the unseen model."""
    model, data, _ = unseen_model_and_data
    demo_argv = ["--DEMO=True", "--MAX_TRAIN_STEPS=10", "--NUM_INFERENCE_STEPS=2", f"--OUTPUT_DIR={tmp_path_factory.mktemp('demo') / 'out'}"]
    unseen_argv = [f"--MODEL_ID={model}", f"--DATA_DIR={data}", "--MIXED_PRECISION=no", f"--OUTPUT_DIR={tmp_path_factory.mktemp('unseen_out') / 'out'}",
                   "--MAX_TRAIN_STEPS=4", "--RESOLUTION=64", "--NUM_INFERENCE_STEPS=2", "--BATCH_SIZE=3",
                   "--GRADIENT_ACCUMULATION_STEPS=1", "--LEARNING_RATE=1e-2", "--LORA_RANK=2", "--LORA_ALPHA=2",
                   "--TARGET_MODULES=to_q,to_v,to_out.0", "--SEED=123", "--GUIDANCE_SCALE=5.0",
                   "--VALIDATION_PROMPTS=a green square on a yellow background"]
    return {name: (argv, run_script(*argv)) for name, argv in (("demo", demo_argv), ("unseen", unseen_argv))}


def test_demo_writes_the_weights_the_image_and_the_config(runs):
    from diffusers import UNet2DConditionModel

    argv, _ = runs["demo"]
    cfg = lce.resolve_config(argv)
    with open(os.path.join(cfg.OUTPUT_DIR, "training_config.json")) as f:
        assert json.load(f) == cfg.as_dict()
    # the weights: exactly one down/up pair per targeted Linear of the tiny UNet, at rank LORA_RANK
    unet = UNet2DConditionModel.from_pretrained(cfg.MODEL_ID, subfolder="unet")
    expected = {}
    for n, m in unet.named_modules():  # from the UNet's own Linear layers, independent of PEFT
        if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in cfg.TARGET_MODULES):
            expected.update({f"unet.{n}.lora.down.weight": (cfg.LORA_RANK, m.in_features),
                             f"unet.{n}.lora.up.weight": (m.out_features, cfg.LORA_RANK)})
    with safe_open(os.path.join(cfg.OUTPUT_DIR, lce.WEIGHTS_NAME), "pt") as f:
        shapes, meta = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()
    assert shapes == expected and len(shapes) == 56  # the demo's UNet: 28 cross-attention projections, rank 4
    assert sum(a * b for a, b in shapes.values()) == 12_032 and json.loads(meta["training_config"]) == cfg.as_dict()
    image = png(os.path.join(cfg.OUTPUT_DIR, "test_generation.png"))
    assert image.shape == (64, 64, 3) and image.std() > 0  # a rendered picture at the training size, not a blank canvas


def test_demo_prints_its_scores_and_when_little_was_learned_where_to_look(runs):
    """The console and concept_scores.json say the same; a LoRA that hardly learned purple (under +30
    points) gets one line naming the diagnosis command for this OUTPUT_DIR, and only then."""
    argv, r = runs["demo"]
    out = lce.resolve_config(argv).OUTPUT_DIR
    with open(os.path.join(out, "concept_scores.json")) as f:
        scores = json.load(f)
    base, tuned = scores["base"]["concept"]["colour"], scores["base + LoRA"]["concept"]["colour"]
    assert f"base {base:.0%}  ->  base + LoRA {tuned:.0%}" in r.stdout
    hint = f"`python benchmarks/demo_diagnosis.py {os.path.abspath(out)}` measures why"
    assert (hint in r.stdout) == (tuned < base + 0.3), r.stdout[-2000:]


@pytest.mark.parametrize("name", ["demo", "unseen"])
def test_a_run_prints_no_warning_echoes_and_no_library_noise(runs, name):
    """The reload check adds a second adapter (PEFT warns about that) and the UNet-only file has no
    text-encoder keys (diffusers logs that): both mean nothing to a user, and are silenced where they
    arise. A notice of ours is a printed line, never a warnings.warn echo."""
    _, r = runs[name]
    text = r.stdout + r.stderr
    assert not WARNING_ECHO.findall(text), WARNING_ECHO.findall(text)
    assert not [noise for noise in LIBRARY_NOISE if noise in text]
    assert "reload check:" in r.stdout and "test image:" in r.stdout  # the steps that used to make the noise ran


def test_a_notice_of_ours_is_seen_by_the_warning_pattern():
    """Negative control for the pattern above: what warnings.warn prints is caught."""
    import warnings

    assert WARNING_ECHO.search(warnings.formatwarning("x", UserWarning, "/a/peft/tuners_utils.py", 331, "warnings.warn("))


def test_unseen_model_and_data_end_to_end_match_plain_diffusers(runs, unseen_model_and_data):
    from diffusers import DDIMScheduler

    model, data, n_images = unseen_model_and_data
    argv, _ = runs["unseen"]
    cfg = lce.resolve_config(argv)
    assert DDIMScheduler.from_pretrained(model, subfolder="scheduler").config.prediction_type == "v_prediction"
    # all six pictures (grey, palette, alpha, JPEG, WebP, in a subfolder) with their .txt captions
    images, captions = lce.load_captioned_images(cfg, show_progress=False)
    assert len(images) == n_images
    assert all(open(os.path.splitext(i)[0] + ".txt", encoding="utf-8").read().strip() == c for i, c in zip(images, captions))
    with capture_library_messages() as messages:
        pipe = fresh_pipe(model, cfg.OUTPUT_DIR)
    assert key_complaints(messages) == [], messages
    written = os.path.join(cfg.OUTPUT_DIR, "test_generation.png")
    assert pixel_diff(written, render(pipe, cfg)) <= 1
    # the adapter diffusers loaded is the one we trained: rank 2 on the three chosen projections
    lora_layers = {n: m for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "default_0" in m.lora_A}
    assert lora_layers and all(n.rsplit(".", 1)[-1] in ("to_q", "to_v") or n.endswith("to_out.0") for n in lora_layers)
    assert {m.lora_A["default_0"].out_features for m in lora_layers.values()} == {2}
    assert pixel_diff(written, render(fresh_pipe(model), cfg)) > 1  # and it matters: without it, another picture


def test_rendering_adds_nothing_to_the_training_memory_peak(runs, unseen_model_and_data):
    """Host memory peaks (RSS high-water marks, printed by the script): after training, and for the
    whole run. The rendering pipeline loads a second UNet of 150 MB; with the trained models freed
    first it reuses their memory (measured: +0.02 GB), else the peak grows by one UNet (+0.18 GB)."""
    model, _, _ = unseen_model_and_data
    _, r = runs["unseen"]
    trained = float(re.search(r"^trained \d+ steps in \S+s; peak host memory \(RSS\) so far: (\S+) GB$", r.stdout, re.M).group(1))
    whole = float(re.search(r"^whole run: peak host memory \(RSS\) so far: (\S+) GB$", r.stdout, re.M).group(1))
    unet_gb = os.path.getsize(os.path.join(model, "unet", "diffusion_pytorch_model.safetensors")) / 2**30
    assert unet_gb > 0.14
    assert whole - trained <= 0.5 * unet_gb, (trained, whole, unet_gb)
