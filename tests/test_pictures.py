"""lora_tools.pictures: grid geometry and labels, the loss curve and its smoothing, the metrics
reader, and the LoRA spectrum (ΔW read from PEFT, checked against PEFT's own merge)."""
import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lora_tools import pictures as P

W, H = 40, 30  # cell size of the test grids


def cells(n, size=(W, H)):
    """n distinct solid-colour images (no white in them, so ink and images are easy to tell apart)."""
    return [Image.new("RGB", size, (20 + 37 * i % 200, 60 + 53 * i % 180, 10 + 91 * i % 220)) for i in range(n)]


def pixels(img, box=None):
    return np.asarray(img.crop(box) if box else img)


def has_ink(img, box):
    """Anything but white in box = (x0, y0, x1, y1)?"""
    return bool((pixels(img, box) != 255).any())


def colour_count(img, colour, box=None):
    return int((pixels(img, box) == np.array(colour, dtype=np.uint8)).all(-1).sum())


def curve_area(img, legend_width):
    """The plots' middle, clear of the legends (which show the same colours) and the panel names."""
    return (200, 0, img.width - legend_width, img.height)


def assert_cells_at(grid, images, cols, x0, y0, row_step):
    """Each image appears unchanged at its computed place: x0 + c (W + GAP), y0 + r row_step."""
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        x, y = x0 + c * (W + P.GAP), y0 + r * row_step
        assert np.array_equal(pixels(grid, (x, y, x + W, y + H)), pixels(img)), f"image {i} not at ({x}, {y})"


# ----------------------------------------------------------------------------- grids
def test_grid_size_and_placement_without_labels():
    images = cells(5)
    grid = P.image_grid(images, rows=2)  # 2 x 3, one empty cell
    assert grid.size == (P.GAP + 3 * (W + P.GAP), P.GAP + 2 * (H + P.GAP))
    assert_cells_at(grid, images, cols=3, x0=P.GAP, y0=P.GAP, row_step=H + P.GAP)
    x, y = P.GAP + 2 * (W + P.GAP), P.GAP + H + P.GAP
    assert not has_ink(grid, (x, y, x + W, y + H))  # the empty sixth cell stays white
    assert P.image_grid(cells(9)).size == P.image_grid(cells(9), rows=3).size  # default: near-square


def test_grid_column_labels_band_height_and_ink():
    images = cells(6)
    fnt = P.font(P.label_font_size(W))
    lh = P.line_height(fnt)
    short = P.image_grid(images, rows=2, labels=["a", "b", "c"])
    band = lh + 2 * P.PAD  # one line of text
    assert short.size == (P.GAP + 3 * (W + P.GAP), P.GAP + band + 2 * (H + P.GAP))
    assert_cells_at(short, images, cols=3, x0=P.GAP, y0=P.GAP + band, row_step=H + P.GAP)
    for c in range(3):  # each column's label is drawn, in its own column
        x = P.GAP + c * (W + P.GAP)
        assert has_ink(short, (x, P.GAP, x + W, P.GAP + band))

    long = "a very long prompt that cannot possibly fit in forty pixels of width, not even in three lines"
    grid = P.image_grid(images, rows=2, labels=[long, "b", "c"])
    band = P.MAX_LABEL_LINES * lh + 2 * P.PAD  # capped at MAX_LABEL_LINES lines
    assert grid.size == (P.GAP + 3 * (W + P.GAP), P.GAP + band + 2 * (H + P.GAP))
    # no overflow: the band has ink only above the cells, never in the gaps between columns
    ink_columns = (pixels(grid, (0, 0, grid.width, P.GAP + band)) != 255).any(axis=(0, 2))
    in_cell = np.zeros(grid.width, bool)
    for c in range(3):
        in_cell[P.GAP + c * (W + P.GAP): P.GAP + c * (W + P.GAP) + W] = True
    assert ink_columns.any() and not (ink_columns & ~in_cell).any()


def test_grid_row_labels_and_per_cell_labels():
    images = cells(4)
    fnt = P.font(P.label_font_size(W))
    lh = P.line_height(fnt)
    grid = P.image_grid(images, row_labels=["r0", "row 1"])  # rows from row_labels: 2 x 2
    row_w = math.ceil(max(fnt.getlength("r0"), fnt.getlength("row 1"))) + 2 * P.PAD
    assert grid.size == (row_w + P.GAP + 2 * (W + P.GAP), P.GAP + 2 * (H + P.GAP))
    assert_cells_at(grid, images, cols=2, x0=row_w + P.GAP, y0=P.GAP, row_step=H + P.GAP)
    for r in range(2):
        y = P.GAP + r * (H + P.GAP)
        assert has_ink(grid, (0, y, row_w, y + H))

    # one label per image (4 labels, 2 columns): a band above every row
    grid = P.image_grid(images, rows=2, labels=["s0", "s1", "s2", "s3"])
    band = lh + 2 * P.PAD
    assert grid.size == (P.GAP + 2 * (W + P.GAP), P.GAP + 2 * (band + H + P.GAP))
    assert_cells_at(grid, images, cols=2, x0=P.GAP, y0=P.GAP + band, row_step=band + H + P.GAP)
    y1 = P.GAP + band + H + P.GAP  # second row's label band
    assert has_ink(grid, (P.GAP, y1, P.GAP + W, y1 + band))


def test_grid_rejects_mixed_sizes_and_wrong_label_counts():
    with pytest.raises(ValueError, match="resize"):
        P.image_grid(cells(2) + cells(1, size=(W + 1, H)))
    with pytest.raises(ValueError, match="one per column"):
        P.image_grid(cells(4), rows=2, labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="row_labels"):
        P.image_grid(cells(4), rows=2, row_labels=["a"])


def test_wrap_text_fits_width_keeps_short_text_and_truncates_long():
    fnt = P.font(14)
    text = "a photo of a green circle on a blue background"
    lines = P.wrap_text(text, fnt, 120, 10)
    assert " ".join(lines) == text and len(lines) > 1
    assert all(fnt.getlength(s) <= 120 for s in lines)
    cut = P.wrap_text(text + " supercalifragilisticexpialidocious", fnt, 50, 2)
    assert len(cut) == 2 and cut[-1].endswith(P.ELLIPSIS)
    assert all(fnt.getlength(s) <= 50 for s in cut)


def test_comparison_image_is_two_rows_by_prompts():
    base, lora = cells(3), cells(3, size=(W, H))[::-1]
    prompts = ["a red circle", "a much longer prompt about a green square on blue", "x"]
    img = P.comparison_image(base, lora, prompts)
    fnt = P.font(P.label_font_size(W))
    row_cap, max_lines = max(W // 2, 6 * P.label_font_size(W)), H // P.line_height(fnt)
    row_w = math.ceil(max(fnt.getlength(s) for t in ("without LoRA", "with LoRA")
                          for s in P.wrap_text(t, fnt, row_cap, max_lines))) + 2 * P.PAD
    top = img.height - 2 * (H + P.GAP)  # GAP + label band
    assert img.size == (row_w + P.GAP + 3 * (W + P.GAP), top + 2 * (H + P.GAP))
    assert top > P.GAP and has_ink(img, (row_w, 0, img.width, top))  # prompts drawn on top
    assert_cells_at(img, base + lora, cols=3, x0=row_w + P.GAP, y0=top, row_step=H + P.GAP)  # row 0 base, row 1 LoRA
    assert has_ink(img, (0, top, row_w, top + H)) and has_ink(img, (0, top + H + P.GAP, row_w, top + 2 * H + P.GAP))
    with pytest.raises(ValueError, match="per prompt"):
        P.comparison_image(base, lora[:2], prompts)


# ----------------------------------------------------------------------------- metrics and loss curve
def reference_ema(values, beta):
    """Written out independently: s_0 = x_0, s_t = beta s_{t-1} + (1 - beta) x_t."""
    s, out = None, []
    for x in values:
        s = x if s is None else beta * s + (1 - beta) * x
        out.append(s)
    return out


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


def test_loss_curve_png_and_smoothing_match_reference(tmp_path):
    rng = np.random.default_rng(0)
    losses = [0.1 + 0.2 * math.exp(-s / 80) + 0.03 * rng.standard_normal() for s in range(400)]
    losses[10], losses[50], losses[51] = float("nan"), float("inf"), float("-inf")
    records = [{"step": s, "loss": v, "lr": 1e-4 * min(1, s / 50)} for s, v in enumerate(losses)]
    records.append({"step": 400, "event": "validation"})  # other records in the log are ignored
    path = tmp_path / "loss.png"
    steps, smooth, beta = P.save_loss_curve(records, path, beta=0.9)
    finite = [(s, v) for s, v in enumerate(losses) if math.isfinite(v)]
    assert steps == [s for s, _ in finite]
    np.testing.assert_allclose(smooth, reference_ema([v for _, v in finite], 0.9), rtol=1e-12)
    img = Image.open(path)
    assert img.size == (900, 500) and img.format == "PNG"
    for colour in (P.RAW_COLOUR, P.SMOOTH_COLOUR, P.LR_COLOUR):  # raw, smoothed and lr curves are drawn
        assert colour_count(img.convert("RGB"), colour, curve_area(img, 240)) > 100
    # the default beta is reported and used
    _, smooth, beta = P.save_loss_curve(records, path)
    assert beta == P.default_beta(len(finite)) and 0.9 < beta < 1
    np.testing.assert_allclose(smooth, reference_ema([v for _, v in finite], beta), rtol=1e-12)


@pytest.mark.parametrize("case", ["one point", "constant", "all nan", "empty", "no lr", "thousands"])
def test_loss_curve_edge_cases(tmp_path, case):
    records = {
        "one point": [{"step": 7, "loss": 0.3, "lr": 1e-4}],
        "constant": [{"step": s, "loss": 0.2, "lr": 5e-5} for s in range(20)],
        "all nan": [{"step": s, "loss": float("nan")} for s in range(5)],
        "empty": [],
        "no lr": [{"step": s, "loss": 1 / (s + 1)} for s in range(30)],
        "thousands": [{"step": s, "loss": 0.1 + 0.01 * math.sin(s), "lr": 1e-4} for s in range(8000)],
    }[case]
    path = tmp_path / "loss.png"
    steps, smooth, beta = P.save_loss_curve(records, path, size=(640, 360))
    img = Image.open(path).convert("RGB")
    assert img.size == (640, 360)
    n = sum(math.isfinite(r["loss"]) for r in records)
    assert len(steps) == len(smooth) == n
    if n:  # the smoothed curve is drawn; a single point as a dot, not an invisible 1-pixel line
        assert colour_count(img, P.SMOOTH_COLOUR, curve_area(img, 240)) >= 20
        np.testing.assert_allclose(smooth, reference_ema([r["loss"] for r in records], beta))
    if case == "constant":
        assert smooth == [0.2] * 20


# ----------------------------------------------------------------------------- spectrum
def with_spectrum(sigmas, out=24, inp=16, seed=0):
    """ΔW = U diag(sigmas) Vᵀ with orthonormal U (out, k), V (in, k): singular values known exactly."""
    g = torch.Generator().manual_seed(seed)
    k = len(sigmas)
    u = torch.linalg.qr(torch.randn(out, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(inp, k, generator=g, dtype=torch.float64))[0]
    return (u * torch.tensor(sigmas, dtype=torch.float64)) @ v.T


NAME = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_{}"


def test_energy_fractions_of_a_known_spectrum():
    delta = with_spectrum([3.0, 2.0, 1.0]).float()
    energy = P.singular_energy(delta)
    np.testing.assert_allclose(energy[:3].numpy(), [9 / 14, 4 / 14, 1 / 14], atol=1e-6)
    rows, text = P.spectrum_table({NAME.format("q"): delta})
    assert len(rows) == 1 and rows[0]["group"] == "down_blocks.1 attn1" and rows[0]["matrices"] == 1
    np.testing.assert_allclose(rows[0]["cumulative"], [9 / 14, 13 / 14, 1.0], atol=1e-6)  # K = rank = 3
    p = np.array([9, 4, 1]) / 14
    assert rows[0]["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), abs=1e-5)
    assert "down_blocks.1 attn1" in text and "64.3%" in text and "92.9%" in text


def test_rank_one_update_has_all_energy_in_one_direction():
    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(32, 1, generator=g), torch.randn(1, 20, generator=g)
    rows, _ = P.spectrum_table({NAME.format("q"): b @ a}, directions=4)
    assert rows[0]["cumulative"][0] == pytest.approx(1.0, abs=1e-6)
    assert rows[0]["cumulative"] == pytest.approx([1.0] * 4, abs=1e-6)
    assert rows[0]["effective_rank"] == pytest.approx(1.0, abs=1e-4)


def test_groups_average_their_matrices_skip_zero_updates_and_sort_by_block():
    updates = {
        NAME.format("q"): with_spectrum([1.0, 1.0]).float(),  # flat: 50%, 100%
        NAME.format("k"): with_spectrum([3.0, 1.0]).float(),  # 90%, 100%
        NAME.format("v"): torch.zeros(24, 16),  # an untrained matrix (B = 0)
        "up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k": with_spectrum([1.0]).float(),
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": with_spectrum([2.0, 1.0]).float(),
    }
    rows, text = P.spectrum_table(updates)
    assert [r["group"] for r in rows] == ["down_blocks.1 attn1", "mid_block attn1", "up_blocks.2 attn2"]
    down = rows[0]
    assert (down["matrices"], down["zero"]) == (3, 1)
    np.testing.assert_allclose(down["cumulative"], [(0.5 + 0.9) / 2, 1.0], atol=1e-6)
    p = np.array([0.9, 0.1])
    assert down["effective_rank"] == pytest.approx((2.0 + math.exp(-(p * np.log(p)).sum())) / 2, abs=1e-5)
    all_zero, _ = P.spectrum_table({NAME.format("q"): torch.zeros(4, 4)})
    assert all_zero[0]["zero"] == 1 and math.isnan(all_zero[0]["effective_rank"])
    assert P.block_group("text_model.encoder.layers.3.self_attn.q_proj") == "layers.3"


@pytest.fixture(scope="module")
def tiny_unet_with_lora():
    """The tiny UNet with a rank-4, alpha-8 LoRA (scaling 2) and a rank-4 rsLoRA adapter
    (scaling 8/√4 = 4), their B matrices set to random values (PEFT starts them at zero)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    from lora_tools.demo import build_tiny_components

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
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    return unet, layers


def test_lora_updates_read_scaling_from_peft(tiny_unet_with_lora):
    unet, layers = tiny_unet_with_lora
    for adapter, scaling in (("default", 8 / 4), ("rs", 8 / math.sqrt(4))):
        updates = P.lora_updates(unet, adapter)
        assert list(updates) == list(layers) and len(updates) > 0
        for name, delta in updates.items():
            layer = layers[name]
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            assert delta.dtype == torch.float32 and delta.shape == layer.get_base_layer().weight.shape
            torch.testing.assert_close(delta, scaling * (b @ a), rtol=0, atol=1e-6)
            torch.testing.assert_close(delta, layer.get_delta_weight(adapter), rtol=0, atol=1e-6)
        rows, _ = P.spectrum_table(updates)
        assert len(rows[0]["cumulative"]) == 4  # numerical rank = r
        assert sum(r["matrices"] for r in rows) == len(updates)


def test_lora_updates_cover_linear_layers_only():
    """proj_in is a 1x1 Conv2d in SD1.x (use_linear_projection=False): its LoRA is left out."""
    from peft import LoraConfig

    from lora_tools.demo import build_tiny_components

    unet = build_tiny_components()["unet"]
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "proj_in"]))
    convs = [n for n, m in unet.named_modules()
             if n.endswith("proj_in") and isinstance(m.get_base_layer(), torch.nn.Conv2d)]
    updates = P.lora_updates(unet)
    assert convs and updates and all(n.endswith("to_q") for n in updates)


def test_lora_updates_refuse_dora():
    """DoRA's update is not scaling·B·A: a clear error instead of a wrong spectrum."""
    from peft import LoraConfig

    from lora_tools.demo import build_tiny_components

    unet = build_tiny_components()["unet"]
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        P.lora_updates(unet)


def test_lora_updates_equal_merged_minus_base_weights(tiny_unet_with_lora):
    unet, layers = tiny_unet_with_lora
    updates = P.lora_updates(unet)
    base = {n: m.get_base_layer().weight.detach().clone() for n, m in layers.items()}
    try:
        for m in layers.values():
            m.merge(adapter_names=["default"])  # PEFT writes W0 + ΔW into the base Linear
        for n, m in layers.items():
            torch.testing.assert_close(m.get_base_layer().weight - base[n], updates[n], rtol=0, atol=1e-6)
    finally:
        for m in layers.values():
            m.unmerge()


def test_spectrum_plot_png(tmp_path, tiny_unet_with_lora):
    rows, _ = P.spectrum_table(P.lora_updates(tiny_unet_with_lora[0]))
    rows.append(dict(group="untrained", matrices=2, zero=2, cumulative=[float("nan")] * 4,
                     effective_rank=float("nan")))
    path = tmp_path / "spectrum.png"
    P.save_spectrum_plot(rows, path)
    img = Image.open(path).convert("RGB")
    assert img.size == (900, 500)
    plot_only = (63, 0, 900 - 300, 500)  # the plot panel, left of the legend
    for colour in (P.PALETTE[0], P.PALETTE[len(rows) - 2]):  # the first and last live curves: lines, not
        assert colour_count(img, colour, plot_only) > 200  # just their ~4 markers (< 150 pixels)
