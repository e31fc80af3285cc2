"""LoRA learns something: the demo's run teaches the pretrained shapes model (demo_base/) the colour
purple, and base + LoRA, loaded with plain diffusers, draws purple on prompts the LoRA never saw.

A picture is judged by lora_tools/shapes.py (pixel arithmetic, no learned model). The negative controls
are the same LoRA at scale 0 (it must draw like the base model) and a LoRA trained the same way on the
same pictures whose captions never say "purple" (they say "violet"): it changes the model as much, but
draws purple for a "purple" prompt far less often.
It fails if the judge or the test could pass by accident (a LoRA that paints everything purple, a
judge that sees purple everywhere), and the main test fails if the training signal is broken
(captions paired with the wrong images, a wrong latent scale or target, a LoRA loaded at the wrong strength).
"""
import json
import os

import pytest
import torch

from conftest import REPO_ROOT, run_main
from lora_tools.shapes import CONCEPT_HELD_OUT, NEW_COLOUR, build_concept_dataset, caption, score, split_base_world

BASE = os.path.join(REPO_ROOT, "demo_base")
# Measured with the shipped demo_base/ (held-out base-world prompts 52% drawn fully right), the demo's own
# report (4 seeds, 20 sampler steps): purple 4% -> 64% on the held-out purple prompts, all three right 0% -> 54%,
# the base world 52% -> 45%. The thresholds below leave room for this test's shorter rendering (3 seeds, 15 steps).
SEEDS = [0, 1, 2]
STEPS, GUIDANCE = 15, 4.0  # sampler steps and guidance for judging (the demo judges with 20)


def render(pipe, combos):
    prompts = [caption(*c) for c in combos for _ in SEEDS]
    generators = [torch.Generator().manual_seed(s) for _ in combos for s in SEEDS]
    return pipe(prompts, generator=generators, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64).images


def judge(pipe, combos):
    return score(render(pipe, combos), [c for c in combos for _ in SEEDS])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo's LoRA (its settings, shorter rendering) and the control LoRA ("violet" captions)."""
    root = tmp_path_factory.mktemp("learning")
    violet = root / "violet-shapes"
    build_concept_dataset(str(root / "purple-shapes"))  # the demo's pictures and captions, then renamed
    violet.mkdir()
    with open(root / "purple-shapes" / "metadata.jsonl") as f, open(violet / "metadata.jsonl", "w") as g:
        for line in f:
            rec = json.loads(line)
            os.link(root / "purple-shapes" / rec["file_name"], violet / rec["file_name"])
            g.write(json.dumps(dict(rec, text=rec["text"].replace(NEW_COLOUR, "violet"))) + "\n")
    fast = ["--DEMO=True", "--NUM_INFERENCE_STEPS=2", "--VALIDATION_PROMPTS=a purple circle on a red background"]
    runs = {"purple": run_main([*fast, f"--OUTPUT_DIR={root / 'purple'}"]),
            "violet": run_main([*fast, f"--DATA_DIR={violet}", f"--OUTPUT_DIR={root / 'violet'}"])}
    return runs


@pytest.fixture(scope="module")
def scores(trained):
    """Concept and base-world scores of base, base + LoRA, the LoRA at scale 0, and the control LoRA,
    each loaded as a user loads it: from_pretrained + load_lora_weights."""
    from diffusers import StableDiffusionPipeline

    _, base_world = split_base_world()
    pipe = StableDiffusionPipeline.from_pretrained(BASE, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = {"base": {"concept": judge(pipe, CONCEPT_HELD_OUT), "base_world": judge(pipe, base_world)}}
    pipe.load_lora_weights(trained["purple"].out, adapter_name="purple")
    out["lora"] = {"concept": judge(pipe, CONCEPT_HELD_OUT), "base_world": judge(pipe, base_world)}
    pipe.set_adapters(["purple"], adapter_weights=[0.0])
    out["scale 0"] = {"concept": judge(pipe, CONCEPT_HELD_OUT)}
    pipe.load_lora_weights(trained["violet"].out, adapter_name="violet")
    pipe.set_adapters(["violet"])
    out["violet"] = {"concept": judge(pipe, CONCEPT_HELD_OUT)}
    print(json.dumps(out, indent=1))
    return out


def test_base_model_cannot_draw_purple(scores):
    assert scores["base"]["concept"]["colour"] <= 0.1, scores["base"]


def test_lora_teaches_purple_on_prompts_it_never_saw(scores):
    base, lora = scores["base"]["concept"], scores["lora"]["concept"]
    assert lora["colour"] >= 0.4 and lora["colour"] >= base["colour"] + 0.3, (base, lora)
    assert lora["all"] >= base["all"] + 0.25, (base, lora)  # purple triangles and purple on yellow, all three right


def test_lora_keeps_most_of_the_base_models_skill(scores):
    base, lora = scores["base"]["base_world"]["all"], scores["lora"]["base_world"]["all"]
    assert lora >= base - 0.25, (base, lora)


def test_negative_controls_score_like_the_base(scores):
    base, lora = scores["base"]["concept"]["colour"], scores["lora"]["concept"]["colour"]
    assert abs(scores["scale 0"]["concept"]["colour"] - base) <= 0.05, scores  # the same adapter, switched off
    # the same pictures, captions saying "violet": that LoRA learned the colour too, and paints some of it on
    # every prompt (measured: 24% of the held-out purple prompts, against 67% for the demo's LoRA), but far
    # less for the word "purple", which its captions never said
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
