"""The shapes world: the small captioned world the demo's base model knows, and a judge of pictures.

A picture shows one shape (circle, square or triangle) of one colour on a plain background of another
colour, at a random size and place, and its caption says so: "a red circle on a blue background".
The base model (lora_tools/demo_base.py) is pretrained on most of these combinations; a few are held
out, to measure whether it composes attributes it never saw together. The colour purple never appears
in its training data: that is what the demo's LoRA teaches it.

`describe(image)` reads a picture back into (shape, colour, background) with plain pixel arithmetic
(no learned model), so "the model drew what the prompt asked for" is a number, not an impression.
"""
import itertools
import random

import numpy as np

# colours the base model knows; NEW_COLOUR is the concept the demo's LoRA teaches
COLOURS = {"red": (215, 45, 45), "green": (40, 170, 60), "blue": (45, 75, 215), "yellow": (235, 205, 45), "white": (240, 240, 240)}
NEW_COLOUR = "purple"
ALL_COLOURS = dict(COLOURS, purple=(145, 55, 190))
SHAPES = ("circle", "square", "triangle")

SIZE = 64  # pixels, square
FILL_SQUARE, FILL_TRIANGLE = 1.0, 0.5  # shape area / bounding-box area; a circle's is π/4 ≈ 0.785


def caption(shape, colour, background):
    return f"a {colour} {shape} on a {background} background"


def combinations(colours=COLOURS, backgrounds=COLOURS):
    """Every (shape, colour, background) with the shape's colour different from the background's."""
    return [(s, c, b) for s, c, b in itertools.product(SHAPES, colours, backgrounds) if c != b]


def split_base_world(num_held_out=10, seed=0):
    """(train, held_out) combinations of the base world. Every shape, colour and background still
    appears in training; only these particular pairings are new to the model."""
    combos = combinations()
    rng = random.Random(seed)
    rng.shuffle(combos)
    held = combos[:num_held_out]
    return sorted(combos[num_held_out:]), sorted(held)


def draw(shape, colour, background, rng=None, size=SIZE):
    """One picture (PIL RGB, size x size): the shape at a random size and position when `rng` is a
    random.Random, centred at 55% of the width when rng is None. Drawn at 4x and reduced, for soft edges.
    Colours are names of ALL_COLOURS or (r, g, b) tuples."""
    from PIL import Image, ImageDraw

    k = 4
    s = size * (rng.uniform(0.42, 0.66) if rng else 0.55)  # the shape's width, in pixels
    room = (size - s) / 2 - size * 0.06  # keep a margin of background all round
    cx = size / 2 + (rng.uniform(-room, room) if rng else 0)
    cy = size / 2 + (rng.uniform(-room, room) if rng else 0)
    rgb = lambda c: tuple(c) if isinstance(c, (tuple, list)) else ALL_COLOURS[c]  # noqa: E731
    img = Image.new("RGB", (size * k, size * k), rgb(background))
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = [v * k for v in (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)]
    fill = rgb(colour)
    if shape == "circle":
        d.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        d.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; the shapes are {SHAPES}")
    return img.resize((size, size), Image.Resampling.BOX)


def _nearest(rgb, palette, max_distance):
    names = list(palette)
    d = np.linalg.norm(np.array([palette[n] for n in names], dtype=float) - rgb, axis=1)
    return names[int(d.argmin())] if d.min() <= max_distance else None


def describe(image, palette=ALL_COLOURS):
    """(shape, colour, background) that a picture shows, each None where it is unclear.

    background: the median colour of the outer 3-pixel frame. The shape: the pixels far from the
    background colour; its colour is their median, and its kind is read from how much of its bounding
    box it fills (square 1.0, circle π/4 ≈ 0.79, triangle 0.5)."""
    a = np.asarray(image.convert("RGB").resize((SIZE, SIZE)), dtype=float)  # (64, 64, 3)
    frame = np.concatenate([a[:3].reshape(-1, 3), a[-3:].reshape(-1, 3), a[:, :3].reshape(-1, 3), a[:, -3:].reshape(-1, 3)])
    bg_rgb = np.median(frame, axis=0)
    background = _nearest(bg_rgb, palette, 80)
    mask = np.linalg.norm(a - bg_rgb, axis=-1) > 70  # (64, 64) pixels that are not background
    if mask.sum() < 40:  # nothing drawn
        return None, None, background
    colour = _nearest(np.median(a[mask], axis=0), palette, 80)
    rows, cols = np.where(mask.sum(1) >= 2)[0], np.where(mask.sum(0) >= 2)[0]  # ignore stray pixels
    if len(rows) < 4 or len(cols) < 4:
        return None, colour, background
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    fill, aspect = box.mean(), box.shape[0] / box.shape[1]
    shape = None
    if 0.7 < aspect < 1.4:
        shape = "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle" if fill > 0.36 else None
    return shape, colour, background


def score(images, wanted):
    """Fractions of pictures whose shape, colour, background, and all three, are what `wanted`
    [(shape, colour, background), ...] asked for."""
    seen = [describe(img) for img in images]
    hits = {k: [s[i] == w[i] for s, w in zip(seen, wanted)] for i, k in enumerate(("shape", "colour", "background"))}
    hits["all"] = [a and b and c for a, b, c in zip(hits["shape"], hits["colour"], hits["background"])]
    return {k: float(np.mean(v)) for k, v in hits.items()}


# ----------------------------------------------------------------------------- the demo's new concept
# The demo's LoRA learns the colour purple from purple circles and squares on four backgrounds, and is
# judged on combinations it never saw: purple triangles, and purple shapes on a yellow background.
CONCEPT_TRAIN = [(s, NEW_COLOUR, b) for s in ("circle", "square") for b in ("red", "green", "blue", "white")]
CONCEPT_HELD_OUT = [("triangle", NEW_COLOUR, b) for b in ("red", "green", "blue", "white", "yellow")] + [
    ("circle", NEW_COLOUR, "yellow"), ("square", NEW_COLOUR, "yellow")]


def build_concept_dataset(path, per_caption=3, seed=0):
    """The demo's training set: `per_caption` drawings of each CONCEPT_TRAIN combination, written as an
    imagefolder (PNG files + metadata.jsonl with a "text" caption each), once; an existing folder is
    reused (several processes may build it at once: see atomic_folder)."""
    import json
    import os

    from lora_tools.files import atomic_folder

    def write(tmp):
        rng = random.Random(seed)
        with open(os.path.join(tmp, "metadata.jsonl"), "w") as f:
            for i, combo in enumerate(c for c in CONCEPT_TRAIN for _ in range(per_caption)):
                name = f"{i:03d}.png"
                draw(*combo, rng=rng).save(os.path.join(tmp, name))
                f.write(json.dumps({"file_name": name, "text": caption(*combo)}) + "\n")

    return atomic_folder(path, write)


def judge(pipe, combos, seeds, steps, guidance_scale, batch=32):
    """Scores of one picture per (combination, seed), drawn from its caption by `pipe` with a CPU
    generator seeded with that seed, `batch` pictures per pipeline call."""
    import torch

    pairs = [(c, s) for c in combos for s in seeds]
    images = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        images += pipe([caption(*c) for c, _ in chunk], generator=[torch.Generator().manual_seed(s) for _, s in chunk],
                       num_inference_steps=steps, guidance_scale=guidance_scale, height=SIZE, width=SIZE).images
    return score(images, [c for c, _ in pairs])


def concept_scores(pipe, seeds, steps, guidance_scale, base_world):
    """Scores of the pipeline as it is (its LoRA on or off): the new colour on CONCEPT_HELD_OUT
    prompts, and the base world's own prompts `base_world` (no purple in them)."""
    return {"concept": judge(pipe, CONCEPT_HELD_OUT, seeds, steps, guidance_scale),
            "base_world": judge(pipe, base_world, seeds, steps, guidance_scale)}


def concept_report(pipe, seeds, steps, guidance_scale, log=print, path=None):
    """Judge base and base + LoRA (diffusers' disable_lora / enable_lora), say what the numbers mean,
    write them to `path` (JSON) and return one short note per comparison row."""
    import json
    import os

    _, held_out = split_base_world()
    pipe.set_progress_bar_config(disable=True)
    pipe.disable_lora()
    base = concept_scores(pipe, seeds, steps, guidance_scale, held_out)
    pipe.enable_lora()
    tuned = concept_scores(pipe, seeds, steps, guidance_scale, held_out)
    n_concept, n_base = len(CONCEPT_HELD_OUT) * len(seeds), len(held_out) * len(seeds)
    log(f"judged by lora_tools/shapes.py on prompts the LoRA never saw, {len(seeds)} seeds each:\n"
        f"  {NEW_COLOUR} drawn, on {n_concept} pictures of {NEW_COLOUR} triangles and {NEW_COLOUR} shapes on yellow:  "
        f"base {base['concept']['colour']:.0%}  ->  base + LoRA {tuned['concept']['colour']:.0%}"
        f"   (shape, colour and background all right: {base['concept']['all']:.0%} -> {tuned['concept']['all']:.0%})\n"
        f"  the base model's own skill, {n_base} pictures of held-out base-world prompts (no {NEW_COLOUR}) drawn fully right:  "
        f"base {base['base_world']['all']:.0%}  ->  base + LoRA {tuned['base_world']['all']:.0%}\n"
        f"  (the first number is what the LoRA learned; the second is what it costs — a drop there is the LoRA\n"
        f"  overwriting what the base knew, which fewer steps, a lower rank or prior preservation reduce)")
    if tuned["concept"]["colour"] < base["concept"]["colour"] + 0.3:  # hardly learned: say where to look
        where = f" {os.path.dirname(os.path.abspath(path))}" if path else ""
        log(f"  little {NEW_COLOUR}? `python benchmarks/demo_diagnosis.py{where}` measures why (tutorial chapter 4)")
    if path:
        from lora_tools.files import atomic_write_text

        atomic_write_text(path, json.dumps({"seeds": list(seeds), "base": base, "base + LoRA": tuned}, indent=1) + "\n")
    return {label: f"{NEW_COLOUR} {s['concept']['colour']:.0%}, base world {s['base_world']['all']:.0%}"
            for label, s in (("base model", base), ("base + LoRA", tuned))}


# ----------------------------------------------------------------------------- the DreamBooth demo's subject
# lora_dreambooth_example.py --DEMO=True learns one subject, a purple circle, from pictures of it on white,
# named "a zwx circle on a white background"; the class prompt is "a circle on a white background".
def build_subject_dataset(path, subject, count=5, seed=0):
    """`count` pictures of `subject` (shape, colour, background) at random sizes and places, no captions
    (DreamBooth's INSTANCE_PROMPT names them all), written once (atomic_folder)."""
    import os

    from lora_tools.files import atomic_folder

    def write(tmp):
        rng = random.Random(seed)
        for i in range(count):
            draw(*subject, rng=rng).save(os.path.join(tmp, f"{i}.png"))

    return atomic_folder(path, write)


def render_all(pipe, prompts, seeds, steps, guidance_scale, batch=32):
    """One picture per (prompt, seed), each from a CPU generator seeded with that seed."""
    import torch

    pairs = [(p, s) for p in prompts for s in seeds]
    images = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        images += pipe([p for p, _ in chunk], generator=[torch.Generator().manual_seed(s) for _, s in chunk],
                       num_inference_steps=steps, guidance_scale=guidance_scale, height=SIZE, width=SIZE).images
    return images


def subject_report(pipes, subject, seeds, steps, guidance_scale, log=print, word="zwx"):
    """Judge the base model and each DreamBooth LoRA ({name: pipeline with its LoRA loaded}; the base is
    the first with its LoRA disabled): is the subject drawn for its prompt, on its training background and
    on the others; how often its colour leaks into the class prompt, which does not ask for it; how far the
    class prompt's pictures move from the base model's. Returns the scores."""
    shape, colour, background = subject
    others = [b for b in COLOURS if b != background and b != colour]
    subject_prompts = {b: f"a {word} {shape} on a {b} background" for b in [background] + others}
    class_prompts = [f"a {shape} on a {b} background" for b in [background] + others]

    def judge(pipe):
        images = render_all(pipe, list(subject_prompts.values()) + class_prompts, seeds, steps, guidance_scale)
        k = len(seeds)
        seen = {b: [describe(im)[1] == colour for im in images[i * k:(i + 1) * k]] for i, b in enumerate(subject_prompts)}
        class_images = images[len(subject_prompts) * k:]
        return {"subject, trained background": float(np.mean(seen[background])),
                "subject, other backgrounds": float(np.mean([x for b in others for x in seen[b]])),
                f"{colour} in the class prompt": float(np.mean([describe(im)[1] == colour for im in class_images]))}, \
            class_images

    first = next(iter(pipes.values()))
    first.disable_lora()
    base, base_class = judge(first)
    first.enable_lora()
    scores = {"base model": base}
    for name, pipe in pipes.items():
        scores[name], class_images = judge(pipe)
        scores[name]["class prompt: mean |pixel - base pixel|"] = float(np.mean(
            [np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean() for a, b in zip(class_images, base_class)]))
    rows = list(scores["base model"]) + ["class prompt: mean |pixel - base pixel|"]
    width = max(len(r) for r in rows)
    lines = [f"judged by lora_tools/shapes.py, {len(seeds)} seeds per prompt (the subject on its own background and "
             f"{len(others)} others, the class prompt on all {len(class_prompts)}):",
             f"  {'':{width}}  " + "  ".join(f"{n:>14}" for n in scores)]
    for r in rows:
        cells = [scores[n].get(r) for n in scores]
        lines.append(f"  {r:{width}}  " + "  ".join(
            f"{'':>14}" if v is None else f"{v:>14.1f}" if "pixel" in r else f"{v:>14.0%}" for v in cells))
    log("\n".join(lines))
    return scores
