"""LoRA learns something: the demo's run teaches the pretrained shapes model (demo_base/) the colour
purple, and base + LoRA, loaded with plain diffusers, draws purple on prompts the LoRA never saw.

A picture is judged by lora_tools/shapes.py (pixel arithmetic, no learned model; its own tests are below).
The negative control is the same LoRA at scale 0: it must draw exactly the base model's pictures. The
tests fail if the training signal is broken (no purple learned), if the LoRA paints over what the base
model knows (the base world's prompts drawn right far less often), or if the judge sees purple where the
base model draws none.
The demo's run is conftest.demo_run, which test_end_to_end also reads (one xdist group: one worker).

Measured in this test's rendering (3 seeds, 15 sampler steps) for the demo's LoRA trained with SEED 42
(the demo's) and 1-4: purple on the held-out purple prompts 52 / 33 / 24 / 38 / 43% (base 0%), all three
right 48 / 33 / 19 / 29 / 33% (base 0%), the base world drawn fully right 37 / 37 / 37 / 43 / 30% (base 43%).
The LoRA also paints purple on 17-33% of prompts that ask for another colour. A LoRA trained on the same
pictures captioned "violet" draws purple for "purple" prompts about as often (19-52%): with demo_base/'s
vocabulary both words are colours it never learned, and such a LoRA learns "an unknown colour word ->
purple" (measured with 24 base-world pictures mixed into the data too: still 24-33%). So that control
cannot tell the two apart and is not used; the thresholds below hold for every seed measured.
"""
import json
import os

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT
from lora_tools.shapes import CONCEPT_HELD_OUT, caption, score, split_base_world

BASE = os.path.join(REPO_ROOT, "demo_base")
SEEDS = [0, 1, 2]
STEPS, GUIDANCE = 15, 4.0  # sampler steps and guidance for judging (the demo judges with 20)
pytestmark = pytest.mark.xdist_group("demo")


def render(pipe, combos):
    prompts = [caption(*c) for c in combos for _ in SEEDS]
    generators = [torch.Generator().manual_seed(s) for _ in combos for s in SEEDS]
    return pipe(prompts, generator=generators, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64).images


def judge(pipe, combos):
    return score(render(pipe, combos), [c for c in combos for _ in SEEDS])


@pytest.fixture(scope="module")
def scores(demo_run):
    """Concept and base-world scores of base and base + the demo's LoRA, loaded as a user loads it
    (from_pretrained + load_lora_weights); and the LoRA at scale 0, whose pictures must be the base
    model's, pixel for pixel (the first two held-out prompts, every seed)."""
    from diffusers import StableDiffusionPipeline

    _, base_world = split_base_world()
    pipe = StableDiffusionPipeline.from_pretrained(BASE, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = {"base": {"concept": judge(pipe, CONCEPT_HELD_OUT), "base_world": judge(pipe, base_world)}}
    base_pictures = render(pipe, CONCEPT_HELD_OUT[:2])  # (a batch of the same size as scale 0's: the same arithmetic)
    pipe.load_lora_weights(demo_run.out, adapter_name="purple")
    out["lora"] = {"concept": judge(pipe, CONCEPT_HELD_OUT), "base_world": judge(pipe, base_world)}
    pipe.set_adapters(["purple"], adapter_weights=[0.0])
    scale0 = render(pipe, CONCEPT_HELD_OUT[:2])
    out["scale 0: max |pixel - base pixel|"] = int(max(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()
                                                    for a, b in zip(scale0, base_pictures)))
    print(json.dumps(out, indent=1))
    return out


def test_base_model_cannot_draw_purple(scores):
    assert scores["base"]["concept"]["colour"] <= 0.1, scores["base"]


def test_lora_teaches_purple_on_prompts_it_never_saw(scores):
    base, lora = scores["base"]["concept"], scores["lora"]["concept"]
    assert lora["colour"] >= 0.2 and lora["colour"] >= base["colour"] + 0.2, (base, lora)
    assert lora["all"] >= base["all"] + 0.15, (base, lora)  # purple triangles and purple on yellow, all three right


def test_lora_keeps_most_of_the_base_models_skill(scores):
    base, lora = scores["base"]["base_world"]["all"], scores["lora"]["base_world"]["all"]
    assert lora >= base - 0.15, (base, lora)  # measured: at most 13 points lost (43% -> 30%)


def test_the_lora_at_scale_0_is_the_base_model(scores):
    assert scores["scale 0: max |pixel - base pixel|"] == 0, scores  # the same adapter, switched off


# ----------------------------------------------------------------------------- the judge itself
def test_the_judge_reads_every_drawn_picture_back():
    """describe() reads shape, colour and background back from every kind of picture the shapes world
    draws (3 random sizes and places each), purple shapes included: the learning tests above score
    with it, so a judge that misreads would make them pass or fail by accident."""
    import random

    from lora_tools.shapes import COLOURS, NEW_COLOUR, SHAPES, describe, draw

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
