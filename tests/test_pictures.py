"""lora_tools.pictures and lora_tools.spectrum: grids (placement, nearest-neighbour enlargement, labels),
the metrics reader, the data behind the loss curve (smoothing, y range) plus one rendering check, and the
LoRA spectrum (ΔW read from PEFT, checked against PEFT's own merge; energy shares against a spectrum built
by hand)."""
import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageColor

from lora_tools import pictures as P
from lora_tools import spectrum as S


def noise(n, size, seed=0):
    """n images of random pixels (no two neighbours alike: a blurring resize could not pass as nearest)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 200, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def enlarged(img, k):
    """What nearest-neighbour enlargement by k must give: every source pixel as a k x k block."""
    return np.asarray(img).repeat(k, 0).repeat(k, 1)


def cell(sheet, rows, cols, r, c, cw, ch):
    """The pixels of cell (r, c), at the place image_grid's docstring gives; left and top bands are what
    is left of the sheet's size once the cells are accounted for."""
    left, top = sheet.width - cols * (cw + 2 * P.GAP), sheet.height - rows * (ch + 2 * P.GAP)
    x, y = left + P.GAP + c * (cw + 2 * P.GAP), top + P.GAP + r * (ch + 2 * P.GAP)
    return np.asarray(sheet)[y:y + ch, x:x + cw], left, top


def ink_runs(band):
    """Groups of consecutive pixel rows holding anything but white: one per line of text."""
    edges = np.diff(np.r_[0, (band < 250).any(axis=(1, 2)).astype(int), 0])  # +1 where a run starts, -1 after it
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


# ----------------------------------------------------------------------------- grids
def test_grid_enlarges_by_a_whole_factor_with_nearest_neighbour_and_places_image_i_in_its_cell():
    images = noise(5, (20, 16))
    sheet = P.image_grid(images, rows=2)  # 2 x 3, one empty cell; 16 px high -> x12 = 192 px
    assert sheet.size == (3 * (240 + 2 * P.GAP), 2 * (192 + 2 * P.GAP))  # no label bands
    for i, img in enumerate(images):
        pixels, left, top = cell(sheet, 2, 3, i // 3, i % 3, 240, 192)
        assert (left, top) == (0, 0) and np.array_equal(pixels, enlarged(img, 12)), f"image {i}"
    assert (cell(sheet, 2, 3, 1, 2, 240, 192)[0] == 255).all()  # the sixth cell stays white
    big = noise(2, (300, 200))  # already readable: kept at its size
    assert np.array_equal(cell(P.image_grid(big, rows=1), 1, 2, 0, 1, 300, 200)[0], np.asarray(big[1]))


def test_grid_labels_wrap_inside_their_column_and_row_labels_with_notes_sit_on_the_left():
    images = noise(4, (64, 64), seed=1)
    long = "a photo of a small purple circle drawn on a plain white background in the middle of the picture"
    sheet = P.image_grid(images, rows=2, labels=[long, "x"], row_labels=["base model", "base + LoRA"],
                         notes=[None, "purple drawn: 8/8"])
    a = np.asarray(sheet)
    _, left, top = cell(sheet, 2, 2, 0, 0, 192, 192)
    assert left > 50 and top > 0
    for i, img in enumerate(images):
        assert np.array_equal(cell(sheet, 2, 2, i // 2, i % 2, 192, 192)[0], enlarged(img, 3))
    # column labels: the long prompt wraps onto several lines, every pixel of it inside its own column
    slot = 192 + 2 * P.GAP
    columns = [a[:top, left + c * slot:left + (c + 1) * slot] for c in range(2)]
    assert len(ink_runs(columns[0])) >= 4 and len(ink_runs(columns[1])) == 1
    for band in columns:  # white margins all round: nothing cut off at the edges
        assert (band[:2] >= 250).all() and (band[:, :P.PAD] >= 250).all() and (band[:, -P.PAD:] >= 250).all()
    # row labels beside their row; the note is a second, grey line under its label
    beside = [a[top + r * slot:top + (r + 1) * slot, :left] for r in range(2)]
    assert len(ink_runs(beside[0])) == 1 and len(ink_runs(beside[1])) == 2
    (y0, y1), (y2, y3) = ink_runs(beside[1])
    assert beside[1][y0:y1].min() < 60 and beside[1][y2:y3].min() > 90  # black label, grey note


def test_grid_refuses_mixed_sizes_and_wrong_counts():
    with pytest.raises(ValueError, match="resize"):
        P.image_grid(noise(2, (40, 30)) + noise(1, (41, 30)))
    with pytest.raises(ValueError, match="one per column"):
        P.image_grid(noise(4, (8, 8)), rows=2, labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="3 row_labels"):
        P.image_grid(noise(4, (8, 8)), rows=2, row_labels=["a", "b", "c"])


def test_wrap_fits_the_width_and_keeps_every_character():
    from PIL import ImageFont

    fnt = ImageFont.load_default(size=14)
    text = "a photo of a green circle on a blue background"
    lines = P.wrap(text, fnt, 120)
    assert " ".join(lines) == text and len(lines) > 1 and all(fnt.getlength(s) <= 120 for s in lines)
    lines = P.wrap("supercalifragilisticexpialidocious", fnt, 40)  # a word wider than the line is split
    assert "".join(lines) == "supercalifragilisticexpialidocious" and all(fnt.getlength(s) <= 40 for s in lines)


def test_comparison_image_one_row_per_model_in_order_any_number_of_rows():
    prompts = ["a red circle", "a much longer prompt about a green square on a blue background"]
    base, lora, rank8 = noise(2, (64, 64), 2), noise(2, (64, 64), 3), noise(2, (64, 64), 4)
    pairs = [("base model", base), ("base + LoRA", lora), ("rank 8", rank8)]
    sheet = P.comparison_image(pairs, prompts, notes=["", "purple drawn: 8/8", "7/8"])
    for r, (_, images) in enumerate(pairs):
        for c, img in enumerate(images):
            assert np.array_equal(cell(sheet, 3, 2, r, c, 192, 192)[0], enlarged(img, 3)), (r, c)
    _, left, top = cell(sheet, 3, 2, 0, 0, 192, 192)
    slot = 192 + 2 * P.GAP
    bands = [np.asarray(sheet)[top + r * slot:top + (r + 1) * slot, :left] for r in range(3)]  # beside each row
    widths = [np.ptp(np.flatnonzero((band[slice(*ink_runs(band)[0])] < 250).any(axis=(0, 2)))) for band in bands]
    assert widths[1] > widths[0] > widths[2]  # its label's first line: "base + LoRA" > "base model" > "rank 8"
    as_dict = P.comparison_image(dict(pairs), prompts, notes={"base + LoRA": "purple drawn: 8/8", "rank 8": "7/8"})
    assert np.array_equal(np.asarray(as_dict), np.asarray(sheet))
    with pytest.raises(ValueError, match="one image per prompt"):
        P.comparison_image({"base model": base, "base + LoRA": lora[:1]}, prompts)


# ----------------------------------------------------------------------------- metrics and loss curve
def test_read_metrics_ignores_truncated_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [{"step": 1, "loss": 0.5, "lr": 1e-4}, {"step": 2, "loss": float("nan"), "lr": 1e-4},
            {"step": 3, "loss": 0.4}]
    text = "".join(json.dumps(r) + "\n" for r in good)
    path.write_text(text + '{"step": 4, "lo')
    records = P.read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3] and math.isnan(records[1]["loss"])
    path.write_text(text + "\n")  # complete file, trailing blank line
    assert len(P.read_metrics(path)) == 3
    path.write_text('{"step": 1, "lo\n' + text)  # a broken line in the middle is an error
    with pytest.raises(ValueError, match=":1:"):
        P.read_metrics(path)


def reference_ema(values, beta):
    """Written out independently: s_0 = x_0, s_t = beta s_{t-1} + (1 - beta) x_t."""
    s, out = None, []
    for x in values:
        s = x if s is None else beta * s + (1 - beta) * x
        out.append(s)
    return out


@pytest.mark.parametrize("n, window", [(5, 1), (30, 29 / 20), (400, 399 / 20), (8000, 100)])  # 1 to 100 points
def test_smoothed_curve_is_the_ema_of_the_finite_losses_over_5_percent_of_the_run(n, window):
    rng = np.random.default_rng(n)
    losses = list(0.2 + 0.05 * rng.standard_normal(n))
    losses[n // 2] = float("nan")  # skipped, the smoothing runs over the others
    records = [{"step": s, "loss": v} for s, v in enumerate(losses)] + [{"step": n, "event": "validation"}]
    steps, _, smooth, beta = P.smoothed_loss(records)  # what save_loss_curve draws
    assert steps == [s for s in range(n) if s != n // 2]
    assert 1 / (1 - beta) == pytest.approx(window)  # the EMA's averaging window: ~5% of the n - 1 finite points
    np.testing.assert_allclose(smooth, reference_ema([losses[s] for s in steps], beta), rtol=1e-12)
    np.testing.assert_allclose(P.ema(losses[:3], 0.9), reference_ema(losses[:3], 0.9), rtol=1e-12)


def test_loss_range_leaves_rare_spikes_out_but_keeps_every_smoothed_point():
    loss = [0.1 + 0.01 * math.sin(s) for s in range(1000)]
    loss[100] = loss[500] = 5.0  # two spikes in 1000 points: above the 99th percentile
    smooth = P.ema(loss, 0.5)  # the EMA jumps to ~2.5 at the spikes: still inside the range
    lo, hi = P.loss_range(loss, smooth)
    assert lo < 0.09 and max(smooth) < hi < 5.0
    lo, hi = P.loss_range(loss[:50] + [5.0], loss[:50] + [5.0])  # under 100 points: every value shown
    assert lo < 0.09 and hi > 5.0
    lo, hi = P.loss_range([0.2] * 10, [0.2] * 10)  # a flat curve still gets a range
    assert lo < 0.2 < hi


def near(img, colour, tol=12):
    """Mask of the pixels within `tol` of `colour` (a matplotlib colour string)."""
    return (np.abs(np.asarray(img.convert("RGB"), int) - ImageColor.getrgb(colour)) <= tol).all(-1)


def test_loss_curve_png_shows_loss_and_smoothed_above_the_learning_rate(tmp_path):
    rng = np.random.default_rng(0)
    records = [{"step": s, "loss": 0.1 + 0.2 * math.exp(-s / 80) + 0.03 * rng.standard_normal(),
                "lr": 1e-4 * min(1, s / 50)} for s in range(400)]
    P.save_loss_curve(records, tmp_path / "loss.png")
    img = Image.open(tmp_path / "loss.png")
    assert img.format == "PNG" and img.size == (900, 500)
    rows_of = {c: np.flatnonzero(near(img, c).any(1)) for c in (P.RAW_COLOUR, P.SMOOTH_COLOUR, P.LR_COLOUR)}
    assert all(near(img, c).sum() > 300 for c in rows_of)  # each series is drawn as a line
    assert rows_of[P.SMOOTH_COLOUR].max() < rows_of[P.LR_COLOUR].min()  # loss panel above the lr panel
    short = [{"step": s, "loss": 0.1 + 0.01 * (s % 3), "lr": 1e-4} for s in range(10, 160, 10)]  # 15 logged means
    P.save_loss_curve(short, tmp_path / "short.png")
    short_img = Image.open(tmp_path / "short.png")  # too few points to average: one thick line, no thin copy
    assert near(short_img, P.SMOOTH_COLOUR).sum() > 300 and near(short_img, P.RAW_COLOUR).sum() < 30
    for case in ([], [{"step": 1, "loss": float("nan")}], [{"step": 7, "loss": 0.3}]):  # nothing to plot, one point
        P.save_loss_curve(case, tmp_path / "edge.png")
        assert Image.open(tmp_path / "edge.png").size == (900, 500)


# ----------------------------------------------------------------------------- spectrum
def with_spectrum(sigmas, out=24, inp=16, seed=0):
    """ΔW = U diag(sigmas) Vᵀ with orthonormal U (out, k), V (in, k): singular values known exactly."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out, len(sigmas), generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(inp, len(sigmas), generator=g, dtype=torch.float64))[0]
    return ((u * torch.tensor(sigmas, dtype=torch.float64)) @ v.T).float()


NAME = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_{}"


def test_energy_shares_and_effective_rank_of_a_known_spectrum():
    energy = S.singular_energy(with_spectrum([3.0, 2.0, 1.0])).numpy()  # 16 values, 3 of them non-zero
    np.testing.assert_allclose(energy, [9 / 14, 4 / 14, 1 / 14] + [0] * 13, atol=1e-6)  # σ² / Σσ²
    rows, text = S.spectrum_table({NAME.format("q"): with_spectrum([3.0, 2.0, 1.0])})
    assert len(rows) == 1 and rows[0]["group"] == "down_blocks.1 attn1" and rows[0]["matrices"] == 1
    np.testing.assert_allclose(rows[0]["cumulative"], [9 / 14, 13 / 14, 1.0], atol=1e-6)  # K = rank = 3
    p = np.array([9, 4, 1]) / 14
    assert rows[0]["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), abs=1e-5)
    assert text.splitlines()[3].split() == ["down_blocks.1", "attn1", "1", "64.3%", "92.9%", "100.0%", "2.29"]
    g = torch.Generator().manual_seed(1)  # rank 1: all the energy in one direction
    rows, _ = S.spectrum_table({NAME.format("q"): torch.randn(32, 1, generator=g) @ torch.randn(1, 20, generator=g)},
                               directions=4)
    assert rows[0]["cumulative"] == pytest.approx([1.0] * 4, abs=1e-6)
    assert rows[0]["effective_rank"] == pytest.approx(1.0, abs=1e-4)


def test_groups_average_their_matrices_skip_zero_updates_and_sort_by_block():
    updates = {
        NAME.format("q"): with_spectrum([1.0, 1.0]),  # flat: 50%, 100%
        NAME.format("k"): with_spectrum([3.0, 1.0]),  # 90%, 100%
        NAME.format("v"): torch.zeros(24, 16),  # an untrained matrix (B = 0)
        "up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k": with_spectrum([1.0]),
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": with_spectrum([2.0, 1.0]),
    }
    rows, text = S.spectrum_table(updates)
    assert [r["group"] for r in rows] == ["down_blocks.1 attn1", "mid_block attn1", "up_blocks.2 attn2"]
    assert (rows[0]["matrices"], rows[0]["zero"]) == (3, 1)
    np.testing.assert_allclose(rows[0]["cumulative"], [(0.5 + 0.9) / 2, 1.0], atol=1e-6)
    p = np.array([0.9, 0.1])
    assert rows[0]["effective_rank"] == pytest.approx((2.0 + math.exp(-(p * np.log(p)).sum())) / 2, abs=1e-5)
    all_zero, text = S.spectrum_table({NAME.format("q"): torch.zeros(4, 4)})
    assert all_zero[0]["zero"] == 1 and math.isnan(all_zero[0]["effective_rank"]) and "all zero" in text
    assert S.block_group("text_model.encoder.layers.3.self_attn.q_proj") == "layers.3"


@pytest.fixture(scope="module")
def tiny_unet_with_lora():
    """The tiny UNet with a rank-4, alpha-8 LoRA (scaling 2) and a rank-4 rsLoRA adapter
    (scaling 8/√4 = 4), their B matrices set to random values (PEFT starts them at zero)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    from tiny import build_tiny_components

    unet = build_tiny_components()["unet"]
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian"))
    with warnings.catch_warnings():  # "Already found a peft_config": two adapters on purpose
        warnings.simplefilter("ignore")
        unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian",
                                    use_rslora=True), adapter_name="rs")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return unet, {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}


def test_lora_updates_read_scaling_from_peft_and_equal_merged_minus_base(tiny_unet_with_lora):
    unet, layers = tiny_unet_with_lora
    for adapter, scaling in (("default", 8 / 4), ("rs", 8 / math.sqrt(4))):
        updates = S.lora_updates(unet, adapter)
        assert list(updates) == list(layers) and len(updates) > 0
        for name, delta in updates.items():
            layer = layers[name]
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            assert delta.dtype == torch.float32 and delta.shape == layer.get_base_layer().weight.shape
            torch.testing.assert_close(delta, scaling * (b @ a), rtol=0, atol=1e-6)
        rows, _ = S.spectrum_table(updates)
        assert len(rows[0]["cumulative"]) == 4 and sum(r["matrices"] for r in rows) == len(updates)  # rank r
    updates = S.lora_updates(unet)
    base = {n: m.get_base_layer().weight.detach().clone() for n, m in layers.items()}
    try:
        for m in layers.values():
            m.merge(adapter_names=["default"])  # PEFT writes W0 + ΔW into the base Linear
        for n, m in layers.items():
            torch.testing.assert_close(m.get_base_layer().weight - base[n], updates[n], rtol=0, atol=1e-6)
    finally:
        for m in layers.values():
            m.unmerge()


def test_lora_updates_cover_linear_layers_only_and_refuse_dora():
    """proj_in is a 1x1 Conv2d in SD1.x (use_linear_projection=False): its LoRA is left out. DoRA's
    update is not scaling·B·A: a clear error instead of a wrong spectrum."""
    from peft import LoraConfig

    from tiny import build_tiny_components

    unet = build_tiny_components()["unet"]
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "proj_in"]))
    convs = [n for n, m in unet.named_modules()
             if n.endswith("proj_in") and isinstance(m.get_base_layer(), torch.nn.Conv2d)]
    updates = S.lora_updates(unet)
    assert convs and updates and all(n.endswith("to_q") for n in updates)
    unet = build_tiny_components()["unet"]
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        S.lora_updates(unet)


def test_spectrum_plot_png(tmp_path, tiny_unet_with_lora):
    rows, _ = S.spectrum_table(S.lora_updates(tiny_unet_with_lora[0]))
    rows.append(dict(group="untrained", matrices=2, zero=2, cumulative=[float("nan")] * 4,
                     effective_rank=float("nan")))
    P.save_spectrum_plot(rows, tmp_path / "spectrum.png")
    img = Image.open(tmp_path / "spectrum.png")
    assert img.format == "PNG" and img.size == (1000, 550)
    assert near(img, "#1f77b4", tol=3).sum() > 200  # the first group's curve (tab10's first colour)
