"""Pictures of a LoRA run, drawn with PIL only (no matplotlib): image grids, the before/after
comparison, the loss curve, and a look inside the trained adapter (the spectrum of each update ΔW).

    image_grid(images, rows, labels, row_labels)   validation grids, comparison.png, rank sheets
    comparison_image(base_images, lora_images, prompts)
    read_metrics("out/metrics.jsonl") -> records;  save_loss_curve(records, "out/loss.png")
    updates = lora_updates(unet);  rows, text = spectrum_table(updates);  print(text)
    save_spectrum_plot(rows, "out/spectrum.png")

Every function is pure apart from the file it is asked to write. Text drawn into pictures is plain
ASCII: PIL's built-in font has no glyphs for σ, Δ or β.
"""
import json
import math
from collections import OrderedDict

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from lora_tools.files import atomic_path

# layout, in pixels
GAP = 4  # white between grid cells and around the grid
PAD = 4  # white around the text inside a label band
MAX_LABEL_LINES = 3  # a column label longer than this many lines is cut and ends in "..."
ELLIPSIS = "..."
WHITE, BLACK, GREY, LIGHT_GREY = (255, 255, 255), (0, 0, 0), (110, 110, 110), (225, 225, 225)

# loss-curve colours (tests look for these pixels)
RAW_COLOUR = (165, 195, 235)  # thin light line: every logged loss
SMOOTH_COLOUR = (20, 70, 170)  # thick line: the smoothed loss
LR_COLOUR = (200, 90, 20)  # learning-rate panel

# spectrum-plot line colours, one per group (cycled when there are more groups)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 128), (128, 128, 0),
           (0, 128, 128), (128, 0, 0)]


# =============================================================================
# Text helpers
# =============================================================================
def font(size):
    """PIL's built-in scalable font (Pillow >= 10.1 with FreeType); the old bitmap font otherwise."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def line_height(fnt):
    """Pixels from one line of text to the next: ascender + descender."""
    if hasattr(fnt, "getmetrics"):
        ascent, descent = fnt.getmetrics()
        return ascent + descent
    return fnt.getbbox("Agjy|")[3]


def label_font_size(cell_width):
    """A label size that stays readable on 64 px demo cells and 512 px SD cells alike."""
    return max(12, min(32, cell_width // 16))


def wrap_text(text, fnt, max_width, max_lines):
    """Greedy word wrap to `max_width` pixels. A word wider than a line is cut; lines past
    `max_lines` are dropped and the last kept one ends in '...'. Every line fits max_width."""
    lines, current = [], ""
    for word in str(text).split():
        candidate = f"{current} {word}" if current else word
        if fnt.getlength(candidate) <= max_width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while fnt.getlength(word) > max_width and len(word) > 1:  # a word too long for any line
            cut = 1
            while cut < len(word) and fnt.getlength(word[:cut + 1]) <= max_width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and fnt.getlength(last.rstrip() + ELLIPSIS) > max_width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + ELLIPSIS]
    return lines or [""]


def _draw_lines(draw, lines, fnt, box, fill=BLACK):
    """Draw `lines` centred (both ways) in box = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    lh = line_height(fnt)
    y = y0 + (y1 - y0 - lh * len(lines)) / 2
    for line in lines:
        draw.text((x0 + (x1 - x0 - fnt.getlength(line)) / 2, y), line, font=fnt, fill=fill)
        y += lh


# =============================================================================
# 1. Image grids
# =============================================================================
def grid_shape(n, rows=None):
    """(rows, cols) for n images: `rows` as given, or a near-square layout."""
    if rows is None:
        cols = math.ceil(math.sqrt(n))
        return math.ceil(n / cols), cols
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    return rows, math.ceil(n / rows)


def image_grid(images, rows=None, labels=None, row_labels=None, font_size=None, max_label_lines=MAX_LABEL_LINES):
    """Lay out same-size PIL images row by row on white, GAP px apart.

    labels:     one per column (drawn once above the top row), or one per image (drawn above each
                cell), wrapped to the cell width, at most `max_label_lines` lines.
    row_labels: one per row, in a band on the left (e.g. "without LoRA" / "with LoRA", "rank 8").
    Size: width  = row-band + GAP + cols * (w + GAP)
          height = GAP + rows * (h + GAP) + label bands (one on top, or one per row when per-cell).
    """
    images = list(images)
    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    odd = [i for i, im in enumerate(images) if im.size != (w, h)]
    if odd:
        raise ValueError(f"all images must be {w}x{h}; image {odd[0]} is {images[odd[0]].size[0]}x"
                         f"{images[odd[0]].size[1]} — resize them first (img.resize(({w}, {h})))")
    n = len(images)
    rows = len(row_labels) if rows is None and row_labels else rows
    rows, cols = grid_shape(n, rows)
    font_size = font_size or label_font_size(w)
    fnt = font(font_size)
    lh = line_height(fnt)

    # Column labels: one band on top, or one band above every row when each image has its own label.
    per_cell = labels is not None and len(labels) == n and n != cols
    if labels is not None and len(labels) not in (cols, n):
        raise ValueError(f"got {len(labels)} labels for {rows} rows x {cols} columns ({n} images) — "
                         f"give one per column ({cols}) or one per image ({n})")
    wrapped = [wrap_text(t, fnt, w - 2 * PAD, max_label_lines) for t in labels] if labels else []
    band_h = max(len(lines) for lines in wrapped) * lh + 2 * PAD if wrapped else 0

    # Row labels: a left band as wide as the widest line, capped so it never dwarfs the images.
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"got {len(row_labels)} row_labels for {rows} rows")
    row_cap = max(w // 2, 6 * font_size)  # room for ~10 characters even beside tiny cells
    row_wrapped = [wrap_text(t, fnt, row_cap, max(1, h // lh)) for t in row_labels] if row_labels else []
    row_w = math.ceil(max(fnt.getlength(s) for lines in row_wrapped for s in lines)) + 2 * PAD if row_wrapped else 0

    row_step = h + GAP + (band_h if per_cell else 0)  # vertical distance between two rows of cells
    top = GAP + (0 if per_cell else band_h)  # y of the first row (of its label band when per_cell)
    grid = Image.new("RGB", (row_w + GAP + cols * (w + GAP), top + rows * row_step), WHITE)
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        x = row_w + GAP + c * (w + GAP)
        y = top + r * row_step + (band_h if per_cell else 0)
        grid.paste(img.convert("RGB"), (x, y))
        if per_cell:
            _draw_lines(draw, wrapped[i], fnt, (x + PAD, y - band_h + PAD, x + w - PAD, y - PAD))
    if wrapped and not per_cell:
        for c, lines in enumerate(wrapped):
            x = row_w + GAP + c * (w + GAP)
            _draw_lines(draw, lines, fnt, (x + PAD, GAP + PAD, x + w - PAD, GAP + band_h - PAD))
    for r, lines in enumerate(row_wrapped):
        y = top + r * row_step + (band_h if per_cell else 0)
        _draw_lines(draw, lines, fnt, (PAD, y, row_w - PAD, y + h))
    return grid


def comparison_image(base_images, lora_images, prompts, row_labels=("without LoRA", "with LoRA")):
    """Two rows (the base model, then base + LoRA, same seeds), one column per prompt."""
    if not len(base_images) == len(lora_images) == len(prompts):
        raise ValueError(f"need one base and one LoRA image per prompt, got {len(base_images)} base, "
                         f"{len(lora_images)} LoRA images and {len(prompts)} prompts")
    return image_grid(list(base_images) + list(lora_images), rows=2, labels=list(prompts), row_labels=list(row_labels))


# =============================================================================
# Plot helpers: ticks, number formats, a framed panel
# =============================================================================
def nice_ticks(lo, hi, max_ticks=6):
    """Round tick values (1, 2, 2.5 or 5 x 10^k apart) covering [lo, hi]: (ticks, lo', hi') with the
    range widened to the outer ticks. A flat range (lo == hi) is widened around its value."""
    if not hi > lo:
        half = abs(lo) * 0.1 or 1.0
        lo, hi = lo - half, hi + half
    raw = (hi - lo) / max(1, max_ticks - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    ticks = [i * step for i in range(first, last + 1)]
    return ticks, ticks[0], ticks[-1]


def fmt(v):
    """Short tick label: 0.05, 1500, 250000, 2e-5."""
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e6:
        return f"{v:.4g}"
    return f"{v:.2g}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")


class Panel:
    """A rectangle of the canvas with data limits: maps data (x, y) to pixels and draws its frame."""

    def __init__(self, draw, box, xlim, ylim):
        self.draw, self.box, self.xlim, self.ylim = draw, box, xlim, ylim

    def px(self, x, y):
        x0, y0, x1, y1 = self.box
        fx = (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0])
        fy = (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
        fx, fy = min(1.0, max(0.0, fx)), min(1.0, max(0.0, fy))  # off-range values sit on the frame
        return x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)

    def axes(self, xticks, yticks, fnt, ylabel=fmt, xlabel=fmt, show_x=True):
        """Horizontal grid lines with y labels on the left, x ticks below, then the frame."""
        x0, y0, x1, y1 = self.box
        d = self.draw
        for t in yticks:
            _, y = self.px(self.xlim[0], t)
            d.line([(x0, y), (x1, y)], fill=LIGHT_GREY)
            text = ylabel(t)
            d.text((x0 - 6 - fnt.getlength(text), y - line_height(fnt) / 2), text, font=fnt, fill=BLACK)
        for t in xticks:
            x, _ = self.px(t, self.ylim[0])
            d.line([(x, y1), (x, y1 + 4)], fill=BLACK)
            if show_x:
                text = xlabel(t)
                d.text((x - fnt.getlength(text) / 2, y1 + 6), text, font=fnt, fill=BLACK)
        d.rectangle(self.box, outline=BLACK)

    def line(self, xs, ys, colour, width):
        points = [self.px(x, y) for x, y in zip(xs, ys)]
        if len(points) == 1:  # a single point is invisible as a line: draw a dot
            (x, y), r = points[0], max(2, width)
            self.draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif points:
            self.draw.line(points, fill=colour, width=width, joint="curve" if width > 2 else None)


def _step_ticks(lo, hi, max_ticks=8):
    """Round whole-number ticks inside [lo, hi] (steps and directions are counts)."""
    ticks, _, _ = nice_ticks(lo, hi, max_ticks)
    return [t for t in ticks if lo - 1e-9 <= t <= hi + 1e-9 and float(t).is_integer()]


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
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))  # json accepts NaN / Infinity, as json.dumps writes them
        except json.JSONDecodeError as e:
            if number == len(lines):  # the file does not end with "\n": a write still in progress
                break
            raise ValueError(f"{path}:{number}: not JSON ({e.msg}) — only the last line may be incomplete") from e
    return records


def ema(values, beta):
    """Exponential moving average s_t = beta * s_{t-1} + (1 - beta) * x_t, started at s_0 = x_0
    (so no bias towards zero at the start)."""
    out = []
    for x in values:
        out.append(x if not out else beta * out[-1] + (1 - beta) * x)
    return out


def default_beta(n):
    """EMA factor whose averaging window 1/(1-beta) is ~5% of the run, between 1 and 100 points."""
    window = min(100.0, max(1.0, n / 20))
    return 1 - 1 / window


def _finite_series(records, key):
    """(steps, values) of the records holding a finite number under `key` (NaN/inf/None skipped)."""
    steps, values = [], []
    for r in records:
        v, s = r.get(key), r.get("step")
        if isinstance(v, (int, float)) and isinstance(s, (int, float)) and math.isfinite(v):
            steps.append(s)
            values.append(float(v))
    return steps, values


def save_loss_curve(records, path, beta=None, size=(900, 500)):
    """PNG of the training loss: every logged value (thin, light), its EMA (thick), and the learning
    rate in a panel below with its own axis. Non-finite losses are skipped; the EMA runs over the
    finite ones. Returns (steps, smoothed, beta) for the plotted points."""
    steps, loss = _finite_series(records, "loss")
    lr_steps, lr = _finite_series(records, "lr")
    beta = default_beta(len(loss)) if beta is None else beta
    smooth = ema(loss, beta)

    W, H = size
    img = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(img)
    small, title_font = font(13), font(15)
    left, right, top, bottom = 72, W - 20, 46, H - 40
    split = bottom - int(0.27 * (bottom - top)) if lr else bottom  # lr panel takes the bottom ~quarter
    title = (f"training loss: every logged value (thin) and its exponential moving average (thick), "
             f"beta={beta:.3g}, ~{1 / (1 - beta):.0f}-point window")
    draw.text((left, 8), wrap_text(title, title_font, W - left - 10, 1)[0], font=title_font, fill=BLACK)
    notes = []  # honest footnotes under the title: what the picture leaves out
    skipped = sum(1 for r in records if isinstance(r.get("loss"), float) and not math.isfinite(r["loss"]))
    if skipped:
        notes.append(f"{skipped} non-finite value(s) skipped")
    if not loss:
        draw.text((left, 27), "; ".join(notes), font=small, fill=(190, 0, 0))
        draw.text((left + 20, (top + bottom) / 2), "no finite loss values to plot", font=title_font, fill=BLACK)
        _save_png(img, path)
        return steps, smooth, beta

    xlo, xhi = (min(steps), max(steps)) if max(steps) > min(steps) else (steps[0] - 1, steps[0] + 1)
    xticks = _step_ticks(xlo, xhi)
    # Diffusion losses are very noisy (they depend on the sampled timestep): with many points, a few
    # spikes would squash the curve, so the y range covers the 1st-99th percentile of raw values
    # (spikes beyond are drawn on the frame) and the whole smoothed curve.
    raw_lo, raw_hi = (np.percentile(loss, [1, 99]) if len(loss) >= 100 else (min(loss), max(loss)))
    yticks, ylo, yhi = nice_ticks(min(raw_lo, min(smooth)), max(raw_hi, max(smooth)))
    clipped = sum(1 for v in loss if not ylo <= v <= yhi)
    if clipped:
        notes.append(f"{clipped} raw value(s) beyond the y range (1st-99th percentile) drawn on the frame")
    draw.text((left, 27), "; ".join(notes), font=small, fill=(190, 0, 0))
    gap = 10 if lr else 0
    loss_panel = Panel(draw, (left, top, right, split - gap), (xlo, xhi), (ylo, yhi))
    loss_panel.axes(xticks, yticks, small, show_x=not lr)
    loss_panel.line(steps, loss, RAW_COLOUR, 1)
    loss_panel.line(steps, smooth, SMOOTH_COLOUR, 3)
    _tag(draw, left + 6, top + 4, "loss", small, BLACK)
    entries = [("raw loss", RAW_COLOUR, 1), (f"EMA beta={beta:.3g}", SMOOTH_COLOUR, 3)]
    _legend(draw, right - 200, top + 6, entries, small)

    if lr:
        lr_ticks, lr_lo, lr_hi = nice_ticks(min(0.0, min(lr)), max(lr), max_ticks=3)
        lr_panel = Panel(draw, (left, split + gap, right, bottom), (xlo, xhi), (lr_lo, lr_hi))
        lr_panel.axes(xticks, lr_ticks, small)
        lr_panel.line(lr_steps, lr, LR_COLOUR, 2)
        _tag(draw, left + 6, split + gap + 4, "learning rate", small, LR_COLOUR)
    draw.text((right - small.getlength("step"), bottom + 22), "step", font=small, fill=GREY)
    _save_png(img, path)
    return steps, smooth, beta


def _legend(draw, x, y, entries, fnt):
    """Small legend: a line sample and a name per entry, on white."""
    lh = line_height(fnt) + 2
    draw.rectangle((x - 6, y - 4, x + 190, y + lh * len(entries) + 2), fill=WHITE, outline=LIGHT_GREY)
    for i, (name, colour, width) in enumerate(entries):
        yy = y + i * lh + lh / 2
        draw.line([(x, yy), (x + 28, yy)], fill=colour, width=width)
        draw.text((x + 36, yy - line_height(fnt) / 2), name, font=fnt, fill=BLACK)


def _tag(draw, x, y, text, fnt, colour):
    """A panel name on a white patch, readable over the curves."""
    draw.rectangle((x - 2, y, x + fnt.getlength(text) + 2, y + line_height(fnt)), fill=WHITE)
    draw.text((x, y), text, font=fnt, fill=colour)


def _dotted(draw, p0, p1, fill=GREY, dash=3, space=5):
    """A dotted straight line (PIL draws only solid ones)."""
    (x0, y0), (x1, y1) = p0, p1
    length = math.hypot(x1 - x0, y1 - y0)
    for start in np.arange(0, length, dash + space):
        a, b = start / length, min(length, start + dash) / length
        draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))], fill=fill)


def _save_png(img, path):
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


# =============================================================================
# 3. Look inside the adapter: the spectrum of each LoRA update ΔW
# =============================================================================
@torch.no_grad()
def lora_updates(model, adapter_name="default"):
    """{module name: ΔW} for every PEFT LoRA Linear layer of `model`, in fp32 on the layer's device.

    LoRA (Hu et al. 2021, Eq. 3): h = W0·x + scaling·B·A·x, so ΔW = scaling·B·A with
    A = lora_A.weight (r, in), B = lora_B.weight (out, r), ΔW (out, in). `scaling` is read from
    PEFT's own dict: α/r, or α/√r with use_rslora, times any scale set later (set_adapters weights).
    """
    from peft.tuners.lora import LoraLayer

    updates = OrderedDict()
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        if not isinstance(module.get_base_layer(), torch.nn.Linear):
            continue  # conv LoRA: ΔW is a 4-d kernel, not one matrix; left out
        if adapter_name in getattr(module, "lora_magnitude_vector", {}):  # DoRA's learned magnitudes
            raise ValueError(f"{name} uses DoRA: its update also rescales the columns of W0, so it is not "
                             "scaling·B·A — this analysis covers plain LoRA only")
        a = module.lora_A[adapter_name].weight.float()  # (r, in)
        b = module.lora_B[adapter_name].weight.float()  # (out, r)
        updates[name] = module.scaling[adapter_name] * (b @ a)  # (out, in), rank <= r
    return updates


def singular_energy(delta):
    """Share of ‖ΔW‖_F² = Σσ_i² held by each singular direction, largest first (sums to 1).
    ΔW = 0 (a fresh adapter, B = 0) has no direction: an empty tensor."""
    # (For big models, σ(s·B·A) = s·σ(R_B·R_Aᵀ) from QR of B and Aᵀ is an r x r problem; the plain
    # SVD is kept here because it is the definition.)
    sigma = torch.linalg.svdvals(delta.detach().float())
    energy = sigma.double() ** 2
    total = energy.sum()
    return energy / total if total > 0 else energy[:0]


def effective_rank(energy):
    """exp(entropy) of the normalised σ² (Roy & Vetterli 2007 use σ; σ² weighs directions by the
    energy they carry): 1 for a rank-1 update, r for r equal directions."""
    p = energy[energy > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def block_group(name):
    """Group key of a module name: the UNet block and the attention kind, e.g.
    'down_blocks.1 attn2' (attn1 = self-attention, attn2 = cross-attention to the text);
    text-encoder layers as 'layers.3'; anything else by its parent module."""
    parts = name.split(".")
    block = None
    for i, part in enumerate(parts):
        if part in ("down_blocks", "up_blocks", "layers") and i + 1 < len(parts):
            block = f"{part}.{parts[i + 1]}"
            break
        if part == "mid_block":
            block = part
            break
    if block is None:
        return ".".join(parts[:-1]) or name
    kind = next((p for p in parts if p in ("attn1", "attn2")), None)
    return f"{block} {kind}" if kind else block


def _group_order(key):
    """down blocks, then the mid block, then up blocks (named_modules lists mid after up)."""
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2, "layers": 3}
    head = key.split(" ")[0].split(".")
    index = int(head[1]) if len(head) > 1 and head[1].isdigit() else 0
    return order.get(head[0], 4), index, key


def spectrum_table(updates, group=block_group, directions=None):
    """Per group of LoRA updates: how much of ΔW's energy lies in its top 1, 2, ..., K singular
    directions, and its effective rank. K (`directions`) defaults to the largest numerical rank
    found (which is at most r). Returns (rows, text); each row is a dict with
      group, matrices, zero (count of ΔW = 0, left out of the means),
      cumulative (K mean fractions: cumulative[k-1] = share of energy in the top k directions),
      effective_rank (mean)."""
    profiles = OrderedDict()  # group -> list of energy vectors (None for ΔW = 0)
    for name, delta in updates.items():
        energy = singular_energy(delta)
        profiles.setdefault(group(name), []).append(energy if len(energy) else None)
    if directions is None:  # numerical rank: directions above 1e-10 of the energy (fp32 noise is ~1e-14)
        ranks = [int((e > 1e-10).sum()) for es in profiles.values() for e in es if e is not None]
        directions = max(ranks, default=1)

    rows = []
    for key in sorted(profiles, key=_group_order):
        live = [e for e in profiles[key] if e is not None]
        row = dict(group=key, matrices=len(profiles[key]), zero=len(profiles[key]) - len(live),
                   cumulative=[float("nan")] * directions, effective_rank=float("nan"))
        if live:
            # cumulative energy, padded with 1.0 past a matrix's last direction
            cum = [torch.cat([e.cumsum(0), e.new_ones(directions)])[:directions] for e in live]
            row["cumulative"] = torch.stack(cum).mean(0).tolist()
            row["effective_rank"] = sum(effective_rank(e) for e in live) / len(live)
        rows.append(row)
    return rows, format_spectrum_table(rows)


def format_spectrum_table(rows):
    """Text table: one row per group; energy columns at k = 1 ... K (K <= 8) or 1, 2, 4, ..., K."""
    k_max = len(rows[0]["cumulative"]) if rows else 0
    if k_max <= 8:
        ks = list(range(1, k_max + 1))
    else:  # a rank-64 adapter would need 64 columns: show k = 1, 2, 4, 8, ..., K
        ks = sorted({2 ** i for i in range(k_max.bit_length()) if 2 ** i <= k_max} | {k_max})
    width = max([len("group")] + [len(r["group"]) for r in rows])
    head = f"{'group':<{width}}  {'n':>3}  " + "  ".join(f"{'top-' + str(k):>7}" for k in ks) + "  eff. rank"
    lines = ["share of |dW|_F^2 in the top-k singular directions (mean over the group's matrices)", head,
             "-" * len(head)]
    for r in rows:
        if r["zero"] == r["matrices"]:
            cells, erank = "  ".join(f"{'-':>7}" for _ in ks), "all zero (untrained, B = 0)"
        else:
            cells = "  ".join(f"{100 * r['cumulative'][k - 1]:>6.1f}%" for k in ks)
            erank = f"{r['effective_rank']:9.2f}" + (f"  ({r['zero']} zero)" if r["zero"] else "")
        lines.append(f"{r['group']:<{width}}  {r['matrices']:>3}  {cells}  {erank}")
    return "\n".join(lines)


def save_spectrum_plot(rows, path, size=(900, 500)):
    """PNG: cumulative energy (%) against the number of directions k, one line per group of
    `spectrum_table` rows. Two dotted guides: 90%, and the diagonal k/K of a flat spectrum (all K
    directions equal). A curve that reaches ~100% at small k: the adapter uses fewer directions
    than its rank, a lower LORA_RANK would likely do."""
    W, H = size
    img = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(img)
    small, title_font = font(13), font(15)
    legend_w = 270
    left, right, top, bottom = 62, W - legend_w - 24, 46, H - 44
    draw.text((left, 8), "LoRA updates dW = scaling*B*A: share of |dW|_F^2 in the top-k singular directions",
              font=title_font, fill=BLACK)
    draw.text((left, 27), "mean over the matrices of each group; dotted: 90% and a flat spectrum (k/K)",
              font=small, fill=GREY)
    k_max = len(rows[0]["cumulative"]) if rows else 1
    live = [r for r in rows if not math.isnan(r["cumulative"][0])]
    # y from a round value below both the data and the flat-spectrum guide (>= 100/K %) up to 100%
    lowest = min([100 * r["cumulative"][0] for r in live] + [100 / k_max])
    yticks, ylo, _ = nice_ticks(max(0.0, lowest - 5), 100.0)
    panel = Panel(draw, (left, top, right, bottom), (0.5, k_max + 0.5), (ylo, 100.0))
    panel.axes(_step_ticks(1, k_max, max_ticks=10), yticks, small, ylabel=lambda v: f"{v:.0f}%")
    _dotted(draw, panel.px(0.5, 90), panel.px(k_max + 0.5, 90))
    _dotted(draw, panel.px(1, 100 / k_max), panel.px(k_max, 100))
    x90, y90 = panel.px(k_max + 0.5, 90)  # label at the right end, where the curves are flat at ~100%
    draw.text((x90 - small.getlength("90%") - 4, y90 + 1), "90%", font=small, fill=GREY)
    label = "k = number of directions"
    draw.text(((left + right - small.getlength(label)) / 2, bottom + 22), label, font=small, fill=GREY)

    ks = list(range(1, k_max + 1))
    for i, r in enumerate(rows):  # every curve, even those the legend has no room to name
        if not math.isnan(r["cumulative"][0]):
            colour, ys = PALETTE[i % len(PALETTE)], [100 * c for c in r["cumulative"]]
            panel.line(ks, ys, colour, 2)
            for x, y in (panel.px(k, y) for k, y in zip(ks, ys)) if k_max <= 16 else ():  # markers, if few
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)

    # legend: colour, group, number of matrices, mean effective rank
    lx, ly, lh = right + 16, top, line_height(small) + 3
    name_w = legend_w - 24 - 90
    col_n, col_rank = lx + 24 + name_w + 30, lx + legend_w - 4  # right edges of the two number columns
    for text, x_right in (("group", None), ("n", col_n), ("eff. rank", col_rank)):
        x = lx + 24 if x_right is None else x_right - small.getlength(text)
        draw.text((x, ly), text, font=small, fill=GREY)
    ly += lh
    for i, r in enumerate(rows):
        if ly + 2 * lh > H - 6:  # legend full: say how many more, rather than draw off the canvas
            draw.text((lx + 24, ly), f"... and {len(rows) - i} more", font=small, fill=GREY)
            break
        colour = PALETTE[i % len(PALETTE)]
        is_live = not math.isnan(r["cumulative"][0])
        draw.line([(lx, ly + lh / 2), (lx + 18, ly + lh / 2)], fill=colour, width=3)
        draw.text((lx + 24, ly), wrap_text(r["group"], small, name_w, 1)[0], font=small, fill=BLACK)
        for text, x_right in ((str(r["matrices"]), col_n),
                              (f"{r['effective_rank']:.2f}" if is_live else "all zero", col_rank)):
            draw.text((x_right - small.getlength(text), ly), text, font=small, fill=BLACK)
        ly += lh
    _save_png(img, path)
