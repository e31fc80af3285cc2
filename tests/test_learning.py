"""LoRA learns something: the demo's run teaches the pretrained shapes model (demo_base/) the colour
purple, and base + LoRA, loaded with plain diffusers, draws purple on prompts the LoRA never saw.

A picture is judged by lora_tools/shapes.py (pixel arithmetic, no learned model). The negative controls
are the same LoRA at scale 0 (it must draw exactly the base model's pictures) and a LoRA trained the
same way on the same pictures whose captions never say "purple" (they say "violet"): it changes the
model as much, but draws purple for a "purple" prompt far less often.
It fails if the judge or the test could pass by accident (a LoRA that paints everything purple, a
judge that sees purple everywhere), and the main test fails if the training signal is broken
(captions paired with the wrong images, a wrong latent scale or target, a LoRA loaded at the wrong strength).
The demo's run is conftest.demo_run, which test_end_to_end also reads (one xdist group: one worker).
"""
import json
import os

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, run_main
from lora_tools.shapes import CONCEPT_HELD_OUT, NEW_COLOUR, build_concept_dataset, caption, score, split_base_world

BASE = os.path.join(REPO_ROOT, "demo_base")
# Measured with the shipped demo_base/ (held-out base-world prompts 52% drawn fully right), the demo's own
# report (4 seeds, 20 sampler steps): purple 4% -> 64% on the held-out purple prompts, all three right 0% -> 54%,
# the base world 52% -> 45%. In this test's rendering (3 seeds, 15 steps): purple 0% -> 67%, all three right
# 0% -> 57%, the base world 43% -> 37%, the violet control 24%. The thresholds below sit near those numbers.
SEEDS = [0, 1, 2]
STEPS, GUIDANCE = 15, 4.0  # sampler steps and guidance for judging (the demo judges with 20)
pytestmark = pytest.mark.xdist_group("demo")


def render(pipe, combos):
    prompts = [caption(*c) for c in combos for _ in SEEDS]
    generators = [torch.Generator().manual_seed(s) for _ in combos for s in SEEDS]
    return pipe(prompts, generator=generators, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64).images


def judge(pipe, combos):
    """(scores, pictures) of one picture per combination and seed."""
    images = render(pipe, combos)
    return score(images, [c for c in combos for _ in SEEDS]), images


@pytest.fixture(scope="module")
def violet(tmp_path_factory, demo_run):
    """The control LoRA: the demo's settings and pictures, its captions saying "violet" for "purple"."""
    root = tmp_path_factory.mktemp("learning")
    violet = root / "violet-shapes"
    build_concept_dataset(str(root / "purple-shapes"))  # the demo's pictures and captions, then renamed
    violet.mkdir()
    with open(root / "purple-shapes" / "metadata.jsonl") as f, open(violet / "metadata.jsonl", "w") as g:
        for line in f:
            rec = json.loads(line)
            os.link(root / "purple-shapes" / rec["file_name"], violet / rec["file_name"])
            g.write(json.dumps(dict(rec, text=rec["text"].replace(NEW_COLOUR, "violet"))) + "\n")
    argv = [a for a in demo_run.argv if not a.startswith("--OUTPUT_DIR=")]
    return run_main([*argv, f"--DATA_DIR={violet}", f"--OUTPUT_DIR={root / 'violet'}"])


@pytest.fixture(scope="module")
def scores(demo_run, violet):
    """Concept and base-world scores of base, base + the demo's LoRA and the control LoRA, each loaded
    as a user loads it (from_pretrained + load_lora_weights); and the demo's LoRA at scale 0, whose
    pictures must be the base model's, pixel for pixel (the first two held-out prompts, every seed)."""
    from diffusers import StableDiffusionPipeline

    _, base_world = split_base_world()
    pipe = StableDiffusionPipeline.from_pretrained(BASE, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = {"base": {"concept": judge(pipe, CONCEPT_HELD_OUT)[0], "base_world": judge(pipe, base_world)[0]}}
    base_pictures = render(pipe, CONCEPT_HELD_OUT[:2])  # (a batch of the same size as scale 0's: the same arithmetic)
    pipe.load_lora_weights(demo_run.out, adapter_name="purple")
    out["lora"] = {"concept": judge(pipe, CONCEPT_HELD_OUT)[0], "base_world": judge(pipe, base_world)[0]}
    pipe.set_adapters(["purple"], adapter_weights=[0.0])
    scale0 = render(pipe, CONCEPT_HELD_OUT[:2])
    out["scale 0: max |pixel - base pixel|"] = int(max(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()
                                                    for a, b in zip(scale0, base_pictures)))
    pipe.load_lora_weights(violet.out, adapter_name="violet")
    pipe.set_adapters(["violet"])
    out["violet"] = {"concept": judge(pipe, CONCEPT_HELD_OUT)[0]}
    print(json.dumps(out, indent=1))
    return out


def test_base_model_cannot_draw_purple(scores):
    assert scores["base"]["concept"]["colour"] <= 0.1, scores["base"]


def test_lora_teaches_purple_on_prompts_it_never_saw(scores):
    base, lora = scores["base"]["concept"], scores["lora"]["concept"]
    assert lora["colour"] >= 0.5 and lora["colour"] >= base["colour"] + 0.4, (base, lora)
    assert lora["all"] >= base["all"] + 0.4, (base, lora)  # purple triangles and purple on yellow, all three right


def test_lora_keeps_most_of_the_base_models_skill(scores):
    base, lora = scores["base"]["base_world"]["all"], scores["lora"]["base_world"]["all"]
    assert lora >= base - 0.12, (base, lora)  # measured: 6 points lost (43% -> 37%)


def test_negative_controls(scores):
    # the same adapter, switched off (adapter weight 0): exactly the base model's pictures
    assert scores["scale 0: max |pixel - base pixel|"] == 0, scores
    # the same pictures, captions saying "violet": that LoRA learned the colour too, and paints some of it on
    # every prompt (measured: 24% of the held-out purple prompts, against 67% for the demo's LoRA), but far
    # less for the word "purple", which its captions never said
    lora = scores["lora"]["concept"]["colour"]
    assert scores["violet"]["concept"]["colour"] <= lora - 0.3, scores


# ----------------------------------------------------------------------------- the judge itself
def test_the_judge_reads_every_drawn_picture_back():
    """describe() reads shape, colour and background back from every kind of picture the shapes world
    draws (3 random sizes and places each), purple shapes included: the learning tests above score
    with it, so a judge that misreads would make them pass or fail by accident."""
    import random

    from lora_tools.shapes import COLOURS, SHAPES, describe, draw

    rng = random.Random(0)
    colours = list(COLOURS) + [NEW_COLOUR]
    wanted = [(s, c, b) for s in SHAPES for c in colours for b in COLOURS if c != b for _ in range(3)]
    seen = [describe(draw(*w, rng=rng)) for w in wanted]
    assert [(w, d) for w, d in zip(wanted, seen) if w != d] == []


def test_the_judge_sees_no_shape_in_a_plain_picture_and_no_purple_in_yellow():
    """Negative controls: a picture with nothing drawn on it has no shape and no colour; a yellow
    shape (what the base model draws for "purple") is yellow, not purple."""
    from lora_tools.shapes import describe, draw

    assert describe(draw("circle", "white", "white")) == (None, None, "white")
    assert describe(draw("triangle", "yellow", "blue")) == ("triangle", "yellow", "blue")
