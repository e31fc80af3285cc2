"""
When a demo LoRA draws little purple on prompts it never saw (too few steps, other settings, another
base): three measurements of a trained demo. On the shipped demo_base/ the demo draws purple on 64% of
them; where a base model reads a colour from, which decides whether a LoRA's new colour carries over at
all, is benchmarks/colour_probe.py.

    python lora_complete_example.py --DEMO=True                  # writes my_lora_model/
    python benchmarks/demo_diagnosis.py                          # or: python benchmarks/demo_diagnosis.py <OUTPUT_DIR>

It loads demo_base/ and the LoRA with plain diffusers and prints, for the LoRA's held-out purple prompts
(lora_tools.shapes.CONCEPT_HELD_OUT, seeds 0-3, 20 sampler steps, judged by lora_tools.shapes):

1. what the LoRA draws for the empty prompt: classifier-free guidance (Section 3.8 of the tutorial) computes
   uncond + s·(cond − uncond), so whatever the LoRA adds to *every* prompt, the empty one included, is
   subtracted out again; only what it adds for "purple" in particular is amplified by s;
2. purple on the held-out prompts at guidance scale 1, 2 and 4 (the demo renders with 4);
3. purple with the LoRA switched on only in the first (noisiest) half of the sampler's steps, or only in
   the second half: which part of the sampling the LoRA changes. A picture's colours are settled early,
   when the picture is still mostly noise; the late steps refine what is already there.
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lora_tools.shapes import CONCEPT_HELD_OUT, NEW_COLOUR, SIZE, caption, describe, judge  # noqa: E402

SEEDS = [0, 1, 2, 3]
STEPS = 20
GUIDANCE = 4.0


def purple_share(images):
    return sum(describe(im)[1] == NEW_COLOUR for im in images) / len(images)


def render(pipe, prompts, seeds, guidance=GUIDANCE, lora_steps=None):
    """Pictures of each (prompt, seed); lora_steps = the sampler step indices that run with the LoRA
    (None = all): diffusers calls callback_on_step_end after each step, where the LoRA is switched for the next."""
    on = (lambda i: True) if lora_steps is None else (lambda i: i in lora_steps)

    def switch(pipe, i, t, kwargs):
        (pipe.enable_lora if on(i + 1) else pipe.disable_lora)()
        return kwargs

    (pipe.enable_lora if on(0) else pipe.disable_lora)()
    pairs = [(p, s) for p in prompts for s in seeds]
    images = pipe([p for p, _ in pairs], generator=[torch.Generator().manual_seed(s) for _, s in pairs],
                  num_inference_steps=STEPS, guidance_scale=guidance, height=SIZE, width=SIZE,
                  callback_on_step_end=switch).images
    pipe.enable_lora()
    return images


def main(out_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(ROOT, "demo_base"), dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(out_dir)
    prompts = [caption(*c) for c in CONCEPT_HELD_OUT]
    n = len(prompts) * len(SEEDS)
    print(f"LoRA: {out_dir}; {n} pictures of held-out purple prompts, seeds {SEEDS}, {STEPS} steps")
    for label, lora in (("base model", False), ("base + LoRA", True)):
        (pipe.enable_lora if lora else pipe.disable_lora)()
        empty = purple_share(pipe([""] * 8, generator=[torch.Generator().manual_seed(s) for s in range(8)],
                                  num_inference_steps=STEPS, guidance_scale=1.0, height=SIZE, width=SIZE).images)
        print(f"1. the empty prompt (no guidance, 8 seeds), {label}: {NEW_COLOUR} in {empty:.0%} of the pictures")
    for g in (1.0, 2.0, GUIDANCE):
        pipe.disable_lora()
        base = judge(pipe, CONCEPT_HELD_OUT, SEEDS, STEPS, g)["colour"]
        pipe.enable_lora()
        lora = judge(pipe, CONCEPT_HELD_OUT, SEEDS, STEPS, g)["colour"]
        print(f"2. guidance scale {g:g}: {NEW_COLOUR} drawn  base {base:.0%}  ->  base + LoRA {lora:.0%}")
    half = STEPS // 2
    for label, steps in (("all steps", None), (f"only steps 1-{half} (noisiest)", set(range(half))),
                         (f"only steps {half + 1}-{STEPS}", set(range(half, STEPS)))):
        print(f"3. LoRA on in {label}: {NEW_COLOUR} drawn in {purple_share(render(pipe, prompts, SEEDS, lora_steps=steps)):.0%}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "my_lora_model"))
