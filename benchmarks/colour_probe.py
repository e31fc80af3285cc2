"""
Where does a text-to-image model read a shape's colour from: the colour's own word, or the words after it?

    python benchmarks/colour_probe.py                     # demo_base/ (under a minute on a 2-core CPU)
    python benchmarks/colour_probe.py <model folder>      # any model of the shapes world

The text encoder turns "a red triangle on a green background" into one vector per token, and the UNet's
cross-attention reads those vectors. This probe takes 15 pairs of prompts that differ only in the shape's
colour (A: "a red triangle ...", B: "a blue triangle ...") and draws A three ways, 2 seeds each:
A as it is; A with the vector at the colour word's place taken from B; A with every vector *after* the
colour word taken from B. lora_tools.shapes.describe reads the colour back. If the UNet reads the colour
at its word, the second drawing turns B's colour; if it reads it from the words after (which a text
encoder with attention layers mixes the colour into), the third does.

Why it matters for LoRA: a LoRA that teaches a new colour on "a purple circle ..." captions carries over
to "a purple triangle ..." only if "purple" means the same vectors in both prompts. It does when the
colour is read at its word (the vector there is the same in every prompt); it does not when it is read
from vectors that mix in the whole caption. That is why demo_base/'s text encoder has no attention
layers (lora_tools/demo_base.py).
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lora_tools.shapes import SHAPES, caption, describe  # noqa: E402

PAIRS = [("red", "blue", "green"), ("blue", "yellow", "red"), ("yellow", "red", "blue"),
         ("white", "green", "blue"), ("green", "white", "red")]  # (colour A, colour B, background)
SEEDS = [0, 1]
COLOUR_AT = 2  # token index of the colour word: <|startoftext|> a COLOUR shape on a ...


@torch.no_grad()
def main(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def encode(prompts):
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    combos = [(s, a, b, bg) for s in SHAPES for a, b, bg in PAIRS]
    a_emb, b_emb = encode([caption(s, a, bg) for s, a, _, bg in combos]), encode([caption(s, b, bg) for s, _, b, bg in combos])
    empty = encode([""] * len(combos))
    i = COLOUR_AT
    ways = {"A as it is": a_emb,
            "A, the colour word's vector from B": torch.cat([a_emb[:, :i], b_emb[:, i:i + 1], a_emb[:, i + 1:]], 1),
            "A, every vector after the colour word from B": torch.cat([a_emb[:, :i + 1], b_emb[:, i + 1:]], 1)}
    print(f"{path}: {len(combos)} prompt pairs x {len(SEEDS)} seeds, colour read back by lora_tools.shapes.describe")
    for name, emb in ways.items():
        colours = []
        for seed in SEEDS:
            images = pipe(prompt_embeds=emb, negative_prompt_embeds=empty, generator=[torch.Generator().manual_seed(seed) for _ in combos],
                          num_inference_steps=20, guidance_scale=4.0, height=64, width=64).images
            colours += [(describe(im)[1], a, b) for im, (_, a, b, _) in zip(images, combos)]
        share = lambda k: sum(c[0] == c[k] for c in colours) / len(colours)  # noqa: E731
        print(f"  {name:<46} drawn in A's colour {share(1):4.0%}   in B's colour {share(2):4.0%}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "demo_base"))
