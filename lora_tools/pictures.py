"""Pictures of a LoRA run: image grids (PIL and diffusers' make_image_grid), the loss curve and a look
inside the trained adapter, the spectrum of each update ΔW (matplotlib, imported only when drawing).

    image_grid(images, rows, labels, row_labels, notes)   validation grids, compare_runs.py sheets
    comparison_image({"base model": base, "base + LoRA": tuned}, prompts, notes={"base + LoRA": "8/8"})
    read_metrics("out/metrics.jsonl") -> records;  save_loss_curve(records, "out/loss_curve.png")
    save_spectrum_plot(rows, "out/rank_spectrum.png")   rows from lora_tools.spectrum.spectrum_table
"""
import itertools
import json
import math
import os
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from lora_tools.files import atomic_path

MIN_CELL = 192  # px: smaller renders (the demo's 64 px) are enlarged by a whole factor to at least this
GAP, PAD = 6, 6  # px of white around every grid cell, and around text
RAW_COLOUR, SMOOTH_COLOUR, LR_COLOUR, VAL_COLOUR = "#9cc3eb", "#16479c", "#c8641e", "#2a9d4b"  # the loss curve's lines


# =============================================================================
# 1. Image grids
# =============================================================================
def wrap(text, fnt, width):
    """Lines of `text`, each at most `width` px wide: never cut off, a too-long word is split."""
    for chars in range(max(1, len(text)), 0, -1):  # textwrap counts characters: narrow until all fit
        lines = textwrap.wrap(text, chars) or [""]
        if all(fnt.getlength(line) <= width for line in lines):
            break
    return lines


def _draw_lines(draw, lines, fnt, x, y, fill="black"):
    """Lines centred on x, the first one's top at y; returns the y below the last."""
    for line in lines:
        draw.text((x, y), line, font=fnt, fill=fill, anchor="ma")
        y += sum(fnt.getmetrics()) + 2
    return y


def image_grid(images, rows=None, labels=None, row_labels=None, notes=None, min_cell=MIN_CELL):
    """Same-size PIL images row by row on white, each enlarged by the whole factor ceil(min_cell / side)
    with nearest-neighbour resampling (a 64 px render shows its pixels, not a blur).
    labels: one per column, above it; row_labels: one per row, on the left, with notes (one per row,
    e.g. a score) in grey under them. Text is wrapped, never cut off. With cw x ch the enlarged size,
    row r, column c sits at x = left + GAP + c·(cw + 2·GAP), y = top + GAP + r·(ch + 2·GAP)."""
    import matplotlib  # only for its font file
    from diffusers.utils import make_image_grid

    images = [im.convert("RGB") for im in images]
    sizes = sorted({im.size for im in images})
    if len(sizes) != 1:
        raise ValueError(f"image_grid needs images of one size, got sizes {sizes} — resize them first "
                         "(img.resize((w, h)))")
    (w, h), n = sizes[0], len(images)
    rows = rows or (len(row_labels) if row_labels else math.ceil(n / math.ceil(math.sqrt(n))))
    cols = math.ceil(n / rows)
    for name, given, count, per in (("labels", labels, cols, "column"), ("row_labels", row_labels, rows, "row"),
                                    ("notes", notes, rows, "row")):
        if given is not None and len(given) != count:
            raise ValueError(f"got {len(given)} {name} for {rows} rows x {cols} columns: give one per {per}")
    scale = max(1, math.ceil(min_cell / min(w, h)))  # whole factor: each source pixel becomes a square block
    cw, ch = w * scale, h * scale
    tiles = [ImageOps.expand(im.resize((cw, ch), Image.Resampling.NEAREST), GAP, "white") for im in images]
    cells = make_image_grid(tiles + [Image.new("RGB", tiles[0].size, "white")] * (rows * cols - n), rows, cols)

    # text: labels above the columns; row labels, and their notes in grey, in a band on the left
    dejavu = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")  # glyphs for any prompt
    font = ImageFont.truetype(dejavu, max(14, min(28, cw // 12)))  # 16 px beside 192 px cells, 28 beside 512
    note_font = ImageFont.truetype(dejavu, max(12, min(22, cw // 15)))
    lh, note_lh = (sum(f.getmetrics()) + 2 for f in (font, note_font))  # line heights, as _draw_lines steps
    heads = [wrap(str(t), font, cw - 2 * PAD) for t in labels or []]
    top = max((len(lines) * lh + PAD for lines in heads), default=0)
    for width in range(max(cw, 200), 20 * cw, 50):  # widen the band until each row's text fits beside the row
        sides = [(wrap(str(t), font, width) if t else [], wrap(str(s), note_font, width) if s else [])
                 for t, s in zip(row_labels or [""] * rows, notes or [""] * rows)]
        if all(len(label) * lh + len(note) * note_lh <= ch for label, note in sides):
            break
    widest = max([font.getlength(s) for label, _ in sides for s in label]
                 + [note_font.getlength(s) for _, note in sides for s in note], default=0)
    left = math.ceil(widest) + 2 * PAD if widest else 0
    sheet = Image.new("RGB", (left + cells.width, top + cells.height), "white")
    sheet.paste(cells, (left, top))
    draw = ImageDraw.Draw(sheet)
    for c, lines in enumerate(heads):
        _draw_lines(draw, lines, font, left + GAP + c * (cw + 2 * GAP) + cw / 2, PAD)
    for r, (label, note) in enumerate(sides):  # centred on the row's images
        y = top + GAP + r * (ch + 2 * GAP) + (ch - len(label) * lh - len(note) * note_lh) / 2
        _draw_lines(draw, note, note_font, left / 2, _draw_lines(draw, label, font, left / 2, y), fill="dimgray")
    return sheet


def comparison_image(rows, prompts, notes=None):
    """The same prompts and seeds rendered by several models: one row per model, one column per prompt.
    rows:  {row label: images} or [(row label, images), ...], e.g. {"base model": base, "base + LoRA": tuned}
    notes: {row label: note} or a list, one per row: a short measured remark ("purple drawn: 8/8")."""
    rows = list(rows.items()) if isinstance(rows, dict) else [(label, images) for label, images in rows]
    if not rows or any(len(images) != len(prompts) for _, images in rows):
        counts = ", ".join(f"{label!r}: {len(images)}" for label, images in rows)
        raise ValueError(f"need one image per prompt in every row, got {len(prompts)} prompts and images {counts}")
    if isinstance(notes, dict):
        notes = [notes.get(label, "") for label, _ in rows]
    return image_grid([im for _, images in rows for im in images], rows=len(rows), labels=list(prompts),
                      row_labels=[label for label, _ in rows], notes=notes)


# =============================================================================
# 2. Training metrics: read the JSONL log, draw the loss curve
# =============================================================================
def read_metrics(path):
    """Records of a metrics JSONL file (one JSON object per line). A last line cut short by a crash
    or by reading during training is ignored; a broken line anywhere else is an error."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records += [json.loads(line)] if line.strip() else []  # json reads the NaN / Infinity it writes
        except json.JSONDecodeError as e:
            if number < len(lines):  # a broken last line (no "\n" after it) is a write still in progress
                raise ValueError(f"{path}:{number}: not JSON ({e.msg}) — only the last line may be incomplete") from e
    return records


def ema(values, beta):
    """Exponential moving average s_t = beta·s_{t-1} + (1 - beta)·x_t from s_0 = x_0 (no bias to 0)."""
    return list(itertools.accumulate(values, lambda s, x: beta * s + (1 - beta) * x))


def finite_series(records, key):
    """(steps, values) of the records holding a finite number under `key` (NaN/inf/None skipped)."""
    pairs = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))
             and isinstance(r.get("step"), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in pairs], [v for _, v in pairs]


def loss_range(loss, smooth):
    """y limits of the loss panel. A diffusion loss is noisy (it depends on the sampled timestep):
    from 100 points on, the range covers the 1st-99th percentile of the raw values (rare spikes leave
    the frame instead of squashing the curve) and all of the smoothed curve; 5% margins."""
    lo, hi = np.percentile(loss, [1, 99]) if len(loss) >= 100 else (min(loss), max(loss))
    lo, hi = min(lo, min(smooth)), max(hi, max(smooth))
    margin = 0.05 * (hi - lo) or 0.1 * abs(hi) or 1.0  # a flat curve still gets a range around it
    return float(lo - margin), float(hi + margin)


def smoothed_loss(records):
    """(steps, losses, smoothed, beta) of the finite losses: the moving average's window 1/(1-beta) is
    ~5% of the run, 1 to 100 logged points."""
    steps, loss = finite_series(records, "loss")
    beta = 1 - 1 / min(100.0, max(1.0, len(loss) / 20))
    return steps, loss, ema(loss, beta), beta


def save_loss_curve(records, path):
    """loss_curve.png (900x500): every logged loss (thin, light; each the mean over LOG_EVERY steps), its
    moving average (thick; left out, and the losses drawn thick, when it would average one point), and the
    learning rate in a panel below. Non-finite losses are skipped."""
    from matplotlib.figure import Figure  # a Figure without pyplot: drawn by Agg, no screen, no global state
    from matplotlib.ticker import MaxNLocator

    steps, loss, smooth, beta = smoothed_loss(records)
    lr_steps, lr = finite_series(records, "lr")
    fig = Figure(figsize=(9, 5), dpi=100, layout="constrained")
    ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1]) if lr else (fig.subplots(), None)
    gaps = sorted({b - a for a, b in zip(steps, steps[1:])})
    what = ("loss of each step" if gaps == [1] else f"mean loss over each {gaps[0]} steps" if len(gaps) == 1
            else "mean loss over each logging interval")
    window = 1 / (1 - beta)  # points the moving average spans
    ax.plot(steps, loss, color=RAW_COLOUR if window >= 1.5 else SMOOTH_COLOUR, lw=0.8 if window >= 1.5 else 2.5,
            marker="o" if len(loss) == 1 else None,
            label=f"{what} (noisy: random timesteps and noise)")
    if window >= 1.5:  # an average over one point would only repeat the line above
        ax.plot(steps, smooth, color=SMOOTH_COLOUR, lw=2.5,
                label=f"smoothed (moving average over ~{window:.0f} logged points): read the trend here")
    val_steps, val = finite_series(records, "val_loss")  # VALIDATION_SPLIT's held-out loss
    if val:
        ax.plot(val_steps, val, color=VAL_COLOUR, lw=2, marker="o", ms=4,
                label="validation loss: held-out pictures, the same noise and timesteps each time")
    skipped = sum("loss" in r for r in records) - len(loss)  # NaN, inf or None
    notes = [f"{skipped} non-finite loss value(s) skipped"] if skipped else []
    if loss:
        lo, hi = loss_range(loss, smooth + val)
        ax.set_ylim(lo, hi)
        off = sum(1 for v in loss if not lo <= v <= hi)
        notes += [f"{off} rare spike(s) beyond the y range"] if off else []
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no finite loss values to plot", transform=ax.transAxes, ha="center")
    ax.set_title("Training loss: how far the UNet's predictions are from their targets (lower is better)"
                 + (f"\n({'; '.join(notes)})" if notes else ""), fontsize=11)
    ax.set(ylabel="loss (MSE)")
    if ax_lr is not None:
        ax_lr.plot(lr_steps, lr, color=LR_COLOUR, lw=2, marker="o" if len(lr) == 1 else None)
        ax_lr.set(ylim=(0, max(lr) * 1.1 or 1), ylabel="learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    (ax_lr or ax).set_xlabel("training step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))  # whole, round steps
    if len(steps) == 1:  # one step: a range around it rather than a zero-width axis
        ax.set_xlim(steps[0] - 2, steps[0] + 2)
    for a in fig.axes:
        a.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


# =============================================================================
# 3. The spectrum of each LoRA update ΔW (the numbers: lora_tools/spectrum.py)
# =============================================================================
def save_spectrum_plot(rows, path):
    """rank_spectrum.png: cumulative energy (%) against the number of directions k, one line per
    lora_tools.spectrum.spectrum_table row, and two dotted guides: 90%, and k/K (a flat spectrum)."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    k_max = len(rows[0]["cumulative"]) if rows else 1
    colours = matplotlib.colormaps["tab20"]  # pairs of shades: a block's attn1 and attn2 side by side
    fig = Figure(figsize=(10, 5.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    for i, r in enumerate(rows):
        if r["zero"] == r["matrices"]:  # nothing to draw: named in the legend only
            ax.plot([], [], color="lightgrey", label=f"{r['group']}: all zero (untrained)")
        else:
            ax.plot(range(1, k_max + 1), [100 * c for c in r["cumulative"]], color=colours(i % 20), ms=4,
                    marker="o" if k_max <= 16 else None, label=f"{r['group']}  ({r['matrices']}, {r['effective_rank']:.2f})")
    ax.axhline(90, color="grey", ls=":", lw=1)
    ax.plot([1, k_max], [100 / k_max, 100], color="grey", ls=":", lw=1, label="flat spectrum: k/K")
    ax.set(xlabel="k = number of top singular directions\n(a curve near 100% at a small k: a lower LORA_RANK would do)",
           ylabel="share of the update's energy |ΔW|²", title="How many directions do the LoRA updates ΔW = scaling·B·A use?")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(PercentFormatter())
    ax.grid(alpha=0.3)
    ax.legend(title="group  (matrices, effective rank)", loc="upper left", bbox_to_anchor=(1.01, 1),
              fontsize="small", ncols=1 + len(rows) // 22)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
