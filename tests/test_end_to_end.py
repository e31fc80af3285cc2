"""The script run as a user runs it (a subprocess): the demo (conftest.demo_run, which the learning
tests also judge), and a model and data it has never seen (v-prediction, a UNet a hundred times the
demo's, pictures of every kind), checked against plain diffusers; its output is quiet (no warning
echoes, no library noise) and its memory peak is the training's: the trained models are freed before
the test image is rendered."""
import json
import os
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

import lora_complete_example as lce
from conftest import capture_library_messages, fresh_pipe, key_complaints, pixel_diff, png, render, run_script
from tiny import build_tiny_pipeline, make_shape_image, tiny_unet_config

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
def unseen_run(tmp_path_factory, unseen_model_and_data):
    model, data, _ = unseen_model_and_data
    argv = [f"--MODEL_ID={model}", f"--DATA_DIR={data}", "--MIXED_PRECISION=no", f"--OUTPUT_DIR={tmp_path_factory.mktemp('unseen_out') / 'out'}",
            "--MAX_TRAIN_STEPS=4", "--RESOLUTION=64", "--NUM_INFERENCE_STEPS=2", "--BATCH_SIZE=3",
            "--GRADIENT_ACCUMULATION_STEPS=1", "--LEARNING_RATE=1e-2", "--LORA_RANK=2", "--LORA_ALPHA=2",
            "--TARGET_MODULES=to_q,to_v,to_out.0", "--SEED=123", "--GUIDANCE_SCALE=5.0",
            "--VALIDATION_PROMPTS=a green square on a yellow background"]
    return argv, run_script(*argv)


demo = pytest.mark.xdist_group("demo")  # the tests that read conftest.demo_run run on one worker (test_learning too)
unseen = pytest.mark.xdist_group("unseen")  # and the three that read the unseen model's run


@demo
def test_demo_writes_the_weights_and_the_image(demo_run):
    from diffusers import UNet2DConditionModel

    cfg = demo_run.cfg
    # the weights: exactly one down/up pair per targeted Linear of the tiny UNet, at rank LORA_RANK
    unet = UNet2DConditionModel.from_pretrained(cfg.MODEL_ID, subfolder="unet")
    expected = {}
    for n, m in unet.named_modules():  # from the UNet's own Linear layers, independent of PEFT
        if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in cfg.TARGET_MODULES):
            expected.update({f"unet.{n}.lora.down.weight": (cfg.LORA_RANK, m.in_features),
                             f"unet.{n}.lora.up.weight": (m.out_features, cfg.LORA_RANK)})
    with safe_open(os.path.join(cfg.OUTPUT_DIR, lce.WEIGHTS_NAME), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == expected and len(shapes) == 56  # the demo's UNet: 28 cross-attention projections, rank 4
    assert sum(a * b for a, b in shapes.values()) == 12_032
    assert f"trained {cfg.MAX_TRAIN_STEPS} steps" in demo_run.stdout
    image = png(os.path.join(cfg.OUTPUT_DIR, "test_generation.png"))
    assert image.shape == (64, 64, 3) and image.std() > 0  # a rendered picture at the training size, not a blank canvas


@demo
def test_demo_prints_the_scores_it_writes(demo_run):
    with open(os.path.join(demo_run.out, "concept_scores.json")) as f:
        scores = json.load(f)
    base, tuned = scores["base"]["concept"]["colour"], scores["base + LoRA"]["concept"]["colour"]
    assert f"base {base:.0%}  ->  base + LoRA {tuned:.0%}" in demo_run.stdout


class DrawingPipe:
    """A pipeline stand-in for concept_report: draws the asked-for picture, with `lora_colour` for the
    shape's colour while its LoRA is on (what a LoRA that learned purple, or learned nothing, draws)."""

    def __init__(self, lora_colour):
        self.lora_colour, self.lora_on = lora_colour, True

    def set_progress_bar_config(self, **kwargs):
        pass

    def disable_lora(self):
        self.lora_on = False

    def enable_lora(self):
        self.lora_on = True

    def __call__(self, prompts, **kwargs):
        from lora_tools.shapes import draw

        images = []
        for p in prompts:  # "a <colour> <shape> on a <background> background"
            _, colour, shape, _, _, background, _ = p.split()
            colour = self.lora_colour if self.lora_on and colour == "purple" else ("yellow" if colour == "purple" else colour)
            images.append(draw(shape, colour, background))
        return SimpleNamespace(images=images)


@pytest.mark.parametrize("lora_colour, hint", [("purple", False), ("yellow", True)])
def test_concept_report_names_the_diagnosis_exactly_when_little_purple_was_learned(tmp_path, lora_colour, hint):
    """A LoRA that draws purple gets its scores and no hint; one that hardly learned purple (under +30
    points) also gets one line naming the diagnosis command for its OUTPUT_DIR."""
    from lora_tools.shapes import concept_report

    lines = []
    concept_report(DrawingPipe(lora_colour), seeds=[0], steps=2, guidance_scale=4.0, log=lines.append,
                   path=str(tmp_path / "concept_scores.json"))
    text = "\n".join(lines)
    tuned = "100%" if lora_colour == "purple" else "0%"
    assert f"base 0%  ->  base + LoRA {tuned}" in text
    assert (f"`python benchmarks/demo_diagnosis.py {tmp_path}` measures why" in text) == hint, text
    with open(tmp_path / "concept_scores.json") as f:
        assert json.load(f)["base + LoRA"]["concept"]["colour"] == (1.0 if lora_colour == "purple" else 0.0)


def quiet(text):
    """No warnings.warn echo and no library noise in a run's console."""
    assert not WARNING_ECHO.findall(text), WARNING_ECHO.findall(text)
    assert not [noise for noise in LIBRARY_NOISE if noise in text]
    assert "reload check:" in text and "test image:" in text  # the steps that used to make the noise ran


@demo
def test_the_demo_prints_no_warning_echoes_and_no_library_noise(demo_run):
    """The reload check adds a second adapter (PEFT warns about that) and the UNet-only file has no
    text-encoder keys (diffusers logs that): both mean nothing to a user, and are silenced where they
    arise. A notice of ours is a printed line, never a warnings.warn echo."""
    quiet(demo_run.stdout + demo_run.stderr)


@unseen
def test_a_run_on_an_unseen_model_prints_no_warning_echoes_and_no_library_noise(unseen_run):
    _, r = unseen_run
    quiet(r.stdout + r.stderr)


@unseen
def test_unseen_model_and_data_end_to_end_match_plain_diffusers(unseen_run, unseen_model_and_data):
    from diffusers import DDIMScheduler

    model, data, n_images = unseen_model_and_data
    argv, _ = unseen_run
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


@unseen
def test_rendering_adds_nothing_to_the_training_memory_peak(unseen_run, unseen_model_and_data):
    """Host memory peaks per phase (RSS high-water marks, printed by the script). The rendering
    pipeline loads a second UNet of 150 MB; with the trained models freed first it reuses their
    memory, else rendering's peak exceeds the earlier phases' by one UNet."""
    model, _, _ = unseen_model_and_data
    _, r = unseen_run
    peaks = {phase: float(gb) for phase, gb in
             re.findall(r"peak host memory \(RSS\) while ([a-z ]+): (\S+) GB", r.stdout)}
    assert set(peaks) == {"loading and caching", "training", "saving and rendering"}, r.stdout
    whole = float(re.search(r"; whole run: (\S+) GB$", r.stdout, re.M).group(1))
    assert whole == max(peaks.values())
    unet_gb = os.path.getsize(os.path.join(model, "unet", "diffusion_pytorch_model.safetensors")) / 2**30
    assert unet_gb > 0.14
    earlier = max(peaks["loading and caching"], peaks["training"])
    assert peaks["saving and rendering"] - earlier <= 0.5 * unet_gb, (peaks, unet_gb)
