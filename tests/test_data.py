"""Data: real-world image files turned into the RGB picture a person sees, folders read with their
captions (notices printed, unreadable files skipped), the latent cache giving the loss of the
uncached path, and the data order: EpochShuffle, a pure function of (seed, epoch), split between
processes by accelerate."""
import io
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import lora_complete_example as lce
from conftest import capture_library_messages, collate_items
from lora_tools.config import UserError
from lora_tools.data import open_image, read_folder, to_rgb
from tiny import _tiny_tokenizer


def folder_cfg(folder, *extra):
    return lce.resolve_config([f"--DATA_DIR={folder}", "--RESOLUTION=64", "--MIXED_PRECISION=no", *extra])


# ----------------------------------------------------------------------------- image files
def rgb(img, xy):
    return to_rgb(img).getpixel(xy)


def close(a, b, tol=0):
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


def test_grayscale_becomes_rgb(tmp_path):
    img = Image.new("L", (2, 1), 128)
    img.putpixel((1, 0), 255)
    assert to_rgb(img).mode == "RGB" and rgb(img, (0, 0)) == (128, 128, 128) and rgb(img, (1, 0)) == (255,) * 3
    img.save(tmp_path / "g.png")
    assert open_image(str(tmp_path / "g.png")).getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("transparency", [None, 0, bytes([0, 255])])
def test_palette_image_with_and_without_transparency(tmp_path, transparency):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, index 1 blue
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    path = str(tmp_path / "p.png")
    img.save(path, **({} if transparency is None else {"transparency": transparency}))
    loaded = open_image(path)
    assert loaded.mode == "RGB"
    # a transparent palette entry is shown on white, not as its hidden colour
    assert loaded.getpixel((0, 0)) == ((255, 0, 0) if transparency is None else (255, 255, 255))
    assert loaded.getpixel((1, 0)) == (0, 0, 255)
    with Image.open(path) as reopened:
        assert reopened.mode == "P"
        assert to_rgb(reopened).getpixel((0, 0)) == loaded.getpixel((0, 0))


def test_rgba_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red: invisible, must not come back red
    img.putpixel((1, 0), (255, 0, 0, 255))
    img.putpixel((2, 0), (0, 0, 255, 128))
    out = to_rgb(img)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (255, 0, 0)
    assert close(out.getpixel((2, 0)), (127, 127, 255), tol=1)
    img.save(tmp_path / "a.png")
    assert open_image(str(tmp_path / "a.png")).getpixel((0, 0)) == (255, 255, 255)


def test_gray_with_alpha_is_composited_on_white(tmp_path):
    img = Image.new("LA", (2, 1))
    img.putpixel((0, 0), (0, 0))  # black but fully transparent
    img.putpixel((1, 0), (0, 255))
    img.save(tmp_path / "la.png")
    for out in (to_rgb(img), open_image(str(tmp_path / "la.png"))):
        assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 0, 0)


def test_cmyk_becomes_rgb(tmp_path):
    img = Image.new("CMYK", (3, 1))
    img.putpixel((0, 0), (0, 255, 255, 0))  # red
    img.putpixel((1, 0), (0, 0, 0, 0))  # white
    img.putpixel((2, 0), (0, 0, 0, 255))  # black
    out = to_rgb(img)
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0)) for x in range(3)] == [(255, 0, 0), (255, 255, 255), (0, 0, 0)]
    big = img.resize((32, 8), Image.NEAREST)
    big.save(tmp_path / "c.jpg", quality=95)
    loaded = open_image(str(tmp_path / "c.jpg"))
    assert loaded.mode == "RGB" and close(loaded.getpixel((4, 4)), (255, 0, 0), tol=40)


def test_16_bit_grayscale_is_rescaled_not_clipped(tmp_path):
    a = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    img.save(tmp_path / "deep.png")
    for out in (to_rgb(img), open_image(str(tmp_path / "deep.png"))):
        px = [out.getpixel((x, 0)) for x in range(4)]
        assert out.mode == "RGB"
        assert px[0] == (0, 0, 0) and px[2] == (255, 255, 255)
        assert all(abs(c - 128) <= 1 for c in px[1])
        assert all(abs(c - 4) <= 1 for c in px[3])  # 1000/65535 of full scale: nearly black


def test_dark_16_bit_image_stays_dark():
    """An 'I;16' image is 16-bit by definition: a value of 200 is 0.3% of white whatever the
    brightest pixel is. Guessing the range from the maximum shows a nearly black photo as light grey."""
    img = Image.fromarray(np.full((2, 2), 200, dtype=np.uint16))
    assert img.mode == "I;16"
    assert all(c <= 2 for c in to_rgb(img).getpixel((0, 0))), to_rgb(img).getpixel((0, 0))


def quadrant_image():
    """40x20 as stored: top-left red, top-right blue, bottom-left green, bottom-right yellow."""
    img = Image.new("RGB", (40, 20))
    for box, colour in (((0, 0, 20, 10), (255, 0, 0)), ((20, 0, 40, 10), (0, 0, 255)),
                        ((0, 10, 20, 20), (0, 255, 0)), ((20, 10, 40, 20), (255, 255, 0))):
        img.paste(colour, box)
    return img


def test_exif_rotated_jpeg_is_shown_upright(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: the camera was turned; display rotated 90° clockwise
    path = str(tmp_path / "phone.jpg")
    quadrant_image().save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    out = open_image(path)
    assert out.size == (20, 40)
    # rotating 90° clockwise: the stored left column becomes the top row, the stored top row the right column
    expected = {(15, 5): (255, 0, 0),  # top-right: stored top-left
                (5, 5): (0, 255, 0),  # top-left: stored bottom-left
                (15, 35): (0, 0, 255),  # bottom-right: stored top-right
                (5, 35): (255, 255, 0)}  # bottom-left: stored bottom-right
    for xy, colour in expected.items():
        assert close(out.getpixel(xy), colour, tol=40), (xy, out.getpixel(xy), colour)


@pytest.mark.parametrize("size", [(16, 16), (1024, 700), (20, 40)])
def test_tiny_and_huge_images_give_resolution_sized_tensors(tmp_path, size):
    path = str(tmp_path / f"img_{size[0]}x{size[1]}.png")
    img = Image.new("RGB", size, (200, 30, 30))
    img.paste((30, 30, 200), (0, 0, size[0] // 2, size[1]))
    img.save(path)
    cfg = folder_cfg(str(tmp_path))
    ds = lce.CaptionedImages([path], torch.zeros(1, 77, dtype=torch.long), cfg)
    for flip in (False, True):
        px = ds[(0, flip, 0)]["pixel_values"]
        assert px.shape == (3, cfg.RESOLUTION, cfg.RESOLUTION) and px.dtype == torch.float32
        assert torch.isfinite(px).all() and px.min() >= -1 and px.max() <= 1



def write_valid_image(path, fmt, size=(96, 80)):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)


def write_truncated(path, fmt):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(buf, format=fmt)
    with open(path, "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])


# ----------------------------------------------------------------------------- folders and captions
def test_broken_files_are_skipped_and_named_in_one_printed_line(tmp_path, capsys):
    d = tmp_path / "photos"
    d.mkdir()
    write_valid_image(d / "good1.png", "PNG")
    write_valid_image(d / "good2.jpg", "JPEG")
    write_truncated(d / "cut.png", "PNG")
    write_truncated(d / "cut.jpg", "JPEG")
    (d / "fake.jpg").write_text("this is a text file with an image extension")
    (d / "notes.md").write_text("# shooting notes\n")
    for stem in ("good1", "good2", "cut", "fake"):
        (d / f"{stem}.txt").write_text(f"a photo called {stem}")
    images, captions = lce.load_captioned_images(folder_cfg(str(d)), show_progress=False)
    assert [os.path.basename(p) for p in images] == ["good1.png", "good2.jpg"]
    assert captions == ["a photo called good1", "a photo called good2"]
    printed = capsys.readouterr().out.splitlines()
    (line,) = [line for line in printed if "unreadable" in line]
    assert re.search(r"skipped 3 unreadable image\(s\) of 5: .*; training on 2$", line), line
    assert all(line.count(bad) == 1 for bad in ("cut.png", "cut.jpg", "fake.jpg")) and "notes.md" not in line


def test_only_unreadable_images_is_a_user_error(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    write_truncated(d / "cut.jpg", "JPEG")
    (d / "fake.png").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match=r"none of the 2 images") as e:
        lce.load_captioned_images(folder_cfg(str(d)), show_progress=False)
    assert str(d) in str(e.value)


def test_images_without_caption_train_with_an_empty_one_said_in_one_line(tmp_path, capsys):
    d = tmp_path / "photos"
    d.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        write_valid_image(d / name, "PNG")
    (d / "a.txt").write_text("a dog on a beach\n")
    (d / "notes.md").write_text("ignore me")
    images, captions = lce.load_captioned_images(folder_cfg(str(d)), show_progress=False)
    assert [os.path.basename(p) for p in images] == ["a.png", "b.png", "c.png"] and captions == ["a dog on a beach", "", ""]
    notes = [line for line in capsys.readouterr().out.splitlines() if "no caption" in line]
    assert notes == [f"note: 2 image(s) in {d} have no caption and train with an empty one: b.png, c.png"]
    item = lce.CaptionedImages(images, lce.tokenize((_tiny_tokenizer(),), captions), folder_cfg(str(d)))[1]
    assert item["pixel_values"].shape == (3, 64, 64) and item["input_ids"].shape == (1, 77)  # one text encoder


def test_a_kohya_dataset_trains_unchanged_each_image_repeats_times_and_cached_once(tmp_path, make_cfg, load_tiny, capsys):
    """kohya's layout: <repeats>_<name>/ subfolders and .caption files. 10_dog/ holds two pictures with
    .caption files, 2_cat/ one with a .txt, and one picture sits at the top level (once)."""
    from tiny import make_shape_image

    for sub, name, colour, ext in (("10_dog", "d1", "red", ".caption"), ("10_dog", "d2", "green", ".caption"),
                                   ("2_cat", "c1", "blue", ".txt"), (".", "top", "yellow", ".txt")):
        (tmp_path / sub).mkdir(exist_ok=True)
        make_shape_image(colour, "circle", "red" if colour == "yellow" else "yellow").save(tmp_path / sub / f"{name}.png")
        (tmp_path / sub / f"{name}{ext}").write_text(f"{name}, a {colour} circle")
    cfg = make_cfg(f"--DATA_DIR={tmp_path}", "--CAPTION_DROPOUT=0.0")
    images, captions = lce.load_captioned_images(cfg, show_progress=False)
    count = {name: sum(os.path.basename(p) == f"{name}.png" for p in images) for name in ("d1", "d2", "c1", "top")}
    assert count == {"d1": 10, "d2": 10, "c1": 2, "top": 1} and len(images) == len(captions) == 23
    assert {c for p, c in zip(images, captions) if p.endswith("d1.png")} == {"d1, a red circle"}  # from d1.caption
    assert "kohya-style folders <repeats>_<name>, each image trained <repeats> times an epoch: 10_dog (2 x 10), 2_cat (1 x 2)" \
        in capsys.readouterr().out
    sd = load_tiny(cfg)
    cached = lce.cache_latents(lce.CaptionedImages(images, lce.tokenize(sd.tokenizers, captions), cfg), sd, cfg,
                               show_progress=False)
    assert len(cached) == 23 and cached.mean.shape[0] == 4  # 23 examples an epoch, 4 pictures encoded
    d1 = [i for i, p in enumerate(images) if p.endswith("d1.png")]
    assert all(torch.equal(cached[(i, True, 5)]["latent_mean"], cached[(d1[0], True, 5)]["latent_mean"]) for i in d1)
    assert not torch.equal(cached[(d1[0], False, 5)]["latent_mean"], cached[(images.index(images[-1]), False, 5)]["latent_mean"])
    epoch = [i for i, _, _ in lce.EpochShuffle(len(cached), 42, True)]
    assert sorted(epoch) == list(range(23))  # every listed example once an epoch: d1 ten times


def test_validation_split_holds_out_whole_pictures_by_seed(make_cfg):
    images = [f"{name}.png" for name in "abcdefgh"] + ["a.png"] * 3  # a.png listed 4 times (kohya's repeats)
    captions = [p[0] for p in images]
    (train, train_caps), (held, held_caps) = lce.split_validation(images, captions, make_cfg("--VALIDATION_SPLIT=0.25"))
    assert len(set(held)) == 2 and not set(held) & set(train) and sorted(set(train) | set(held)) == sorted(set(images))
    assert len(train) + len(held) == 11 and [p[0] for p in held] == held_caps  # each with its caption
    assert lce.split_validation(images, captions, make_cfg("--VALIDATION_SPLIT=0.25"))[1][0] == held  # by SEED
    assert len(set(lce.split_validation(images, captions, make_cfg("--VALIDATION_SPLIT=3"))[1][0])) == 3
    with pytest.raises(UserError, match=r"VALIDATION_SPLIT=8 holds out 8 of 8 images, leaving none to train on"):
        lce.split_validation(images, captions, make_cfg("--VALIDATION_SPLIT=8"))
    assert lce.split_validation(images, captions, make_cfg()) == ((images, captions), ([], []))


def test_read_folder_ignores_non_image_files(tmp_path):
    write_valid_image(tmp_path / "x.png", "PNG")
    (tmp_path / "x.txt").write_text("caption x")
    for name in ("notes.md", "data.json", "Thumbs.db", ".DS_Store"):
        (tmp_path / name).write_text("junk")
    assert read_folder(str(tmp_path)) == [(os.path.normpath(str(tmp_path / "x.png")), "caption x")]


def test_long_captions_are_cut_with_one_message_of_ours_and_none_from_the_library(capsys):
    """transformers would log 'Token indices sequence length is longer than the specified maximum
    ... indexing errors' while the lengths are measured: wrong here (tokenize then cuts them)."""
    tok = _tiny_tokenizer()  # one token per character
    captions = ["a" * 100, "short", "b" * 300, "c" * 75]  # 75 characters + start + end = exactly 77 tokens
    with capture_library_messages() as messages:
        ids = lce.tokenize((tok,), captions)[:, 0]
    assert [m for m in messages if re.search(r"77|longer|sequence length", m)] == []
    ours = [line for line in capsys.readouterr().out.splitlines() if "77" in line or "long" in line]
    assert len(ours) == 1 and "2 caption(s)" in ours[0], ours
    assert ids.shape == (4, 77)
    assert ids[0, 0].item() == tok.bos_token_id and ids[0, -1].item() == tok.eos_token_id  # cut, still well-formed
    assert ids[2, -1].item() == tok.eos_token_id


# ----------------------------------------------------------------------------- the latent cache
@pytest.fixture(scope="module")
def encoders(make_cfg):
    cfg = make_cfg()
    sd = lce.load_models(cfg, lce.detect(cfg.MODEL_ID), torch.float32)
    lce.freeze(sd.unet, sd.vae, *sd.text_encoders)
    lce.add_lora(sd.unet, cfg, cfg.TARGET_MODULES)
    with torch.no_grad():  # a trained-looking adapter, so the LoRA path is part of the comparison
        g = torch.Generator().manual_seed(0)
        for n, p in sd.unet.named_parameters():
            if ".lora_B." in n:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return sd


def datasets(cfg, sd):
    images, captions = lce.load_captioned_images(cfg, show_progress=False)
    ds = lce.CaptionedImages(images, lce.tokenize(sd.tokenizers, captions), cfg)
    return ds, lce.cache_latents(ds, sd, cfg, show_progress=False)


@pytest.mark.parametrize("flip", [False, True])
def test_cached_and_uncached_paths_give_the_same_loss(make_cfg, encoders, flip):
    sd = encoders
    ds, cached = datasets(make_cfg(f"--RANDOM_FLIP={flip}", "--BATCH_SIZE=3"), sd)
    assert len(ds) == len(cached) == 8 and tuple(cached.mean.shape) == (8, 2 if flip else 1, 4, 8, 8)
    picks = [(5, flip, 11), (0, flip, 12), (3, flip, 13), (7, flip, 14)]  # (index, flip, the example's seed)
    cached_batch = collate_items(cached, picks)
    assert set(cached_batch) >= {"latent_mean", "latent_std", "encoder_hidden_states"} and "pixel_values" not in cached_batch
    uncached = lce.compute_loss(collate_items(ds, picks), sd)  # the frozen encoders run now
    torch.testing.assert_close(lce.compute_loss(cached_batch, sd), uncached, rtol=1e-5, atol=1e-7)  # one loss per example
    other_seeds = collate_items(cached, [(i, f, s + 100) for i, f, s in picks])
    assert (lce.compute_loss(other_seeds, sd) - uncached).abs().min() > 1e-4  # other noise, other loss, every example


def test_an_examples_loss_depends_on_its_seed_not_on_its_batch_or_memory_layout(make_cfg, encoders):
    """Each example draws its noise, latent sample and timestep from its own seed: the same loss alone, in
    another batch, and with the latents in another memory layout (the VAE's own output is channels-last on
    the CPU, the cache is contiguous)."""
    sd = encoders
    _, cached = datasets(make_cfg("--RANDOM_FLIP=False"), sd)
    picks = [(1, False, 5), (2, False, 6), (4, False, 7), (6, False, 8)]
    together = lce.compute_loss(collate_items(cached, picks), sd)
    alone = torch.cat([lce.compute_loss(collate_items(cached, [p]), sd) for p in picks])
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-7)
    batch = collate_items(cached, picks)
    channels_last = {k: v.to(memory_format=torch.channels_last) if torch.is_tensor(v) and v.dim() == 4 else v
                     for k, v in batch.items()}
    torch.testing.assert_close(lce.compute_loss(channels_last, sd), together, rtol=1e-5, atol=1e-7)


def test_cache_holds_the_mirrored_image_and_the_captions(make_cfg, encoders):
    sd = encoders
    cfg = make_cfg("--RANDOM_FLIP=True")
    ds, cached = datasets(cfg, sd)
    asymmetric = 0
    for i in range(len(ds)):
        px, mirrored = ds[(i, False, 0)]["pixel_values"], ds[(i, True, 0)]["pixel_values"]
        assert torch.equal(mirrored, px.flip(-1))
        mean, std = lce.encode_images(sd.vae, torch.stack([px, mirrored]))
        torch.testing.assert_close(cached[(i, False, 0)]["latent_mean"], mean[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cached[(i, True, 0)]["latent_mean"], mean[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cached[(i, True, 0)]["latent_std"], std[1], rtol=1e-4, atol=1e-5)
        assert torch.equal(cached[(i, True, 0)]["encoder_hidden_states"], cached[(i, False, 0)]["encoder_hidden_states"])
        asymmetric += (mean[0] - mean[1]).abs().max().item() > 1e-3
    assert asymmetric >= len(ds) // 2  # the two orientations really differ for these pictures
    images, captions = lce.load_captioned_images(cfg, show_progress=False)
    with torch.no_grad():
        text = sd.text_encoders[0](lce.tokenize(sd.tokenizers, captions)[:, 0])[0]  # SD1: the last hidden states
    torch.testing.assert_close(cached.text["encoder_hidden_states"], text, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- data order
def order(n, seed, epoch, flip=True):
    s = lce.EpochShuffle(n, seed, flip)
    s.set_epoch(epoch)
    return list(s)


def test_same_seed_and_epoch_give_the_same_order_flips_and_seeds_and_others_differ():
    assert order(50, 42, 3) == order(50, 42, 3)
    s = lce.EpochShuffle(50, 42, True)  # a resumed run builds a new sampler and jumps to its epoch
    for epoch in range(4):
        s.set_epoch(epoch)
        seen = list(s)
    assert seen == order(50, 42, 3)
    orders = [[i for i, _, _ in order(50, 42, e)] for e in range(5)]
    assert all(orders[a] != orders[b] for a in range(5) for b in range(a + 1, 5))
    assert [i for i, _, _ in order(50, 43, 0)] != orders[0]
    seeds = [s for e in range(5) for _, _, s in order(50, 42, e)]
    assert len(set(seeds)) == len(seeds)  # every example of every epoch draws its own noise


@pytest.mark.parametrize("n", [1, 7, 50])
def test_every_index_appears_exactly_once_per_epoch(n):
    for epoch in range(3):
        items = order(n, 5, epoch)
        assert len(items) == n == len(lce.EpochShuffle(n, 5, True))
        assert sorted(i for i, _, _ in items) == list(range(n))


def test_flips_are_per_epoch_and_absent_without_random_flip():
    flips = [f for e in range(4) for _, f, _ in order(50, 42, e)]
    assert 0.3 < sum(flips) / len(flips) < 0.7
    assert [f for _, f, _ in order(50, 42, 1)] != [f for _, f, _ in order(50, 42, 2)]
    assert all(f is False for e in range(3) for _, f, _ in order(50, 42, e, flip=False))
    # without flips, the order is still the seeded permutation
    assert [i for i, _, _ in order(50, 42, 2, flip=False)] == [i for i, _, _ in order(50, 42, 2, flip=True)]


def test_the_dataloader_over_the_cache_sees_each_image_once_per_epoch(make_cfg, encoders):
    cfg = make_cfg("--RANDOM_FLIP=True", "--BATCH_SIZE=3")
    _, cached = datasets(cfg, encoders)
    loader = lce.make_dataloader(cached, cfg, cuda=False)
    text = cached.text["encoder_hidden_states"]
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        expected = order(len(cached), cfg.SEED, epoch)
        batches = list(loader)
        assert torch.equal(torch.cat([b["encoder_hidden_states"] for b in batches]), text[[i for i, _, _ in expected]])
        assert torch.equal(torch.cat([b["latent_mean"] for b in batches]),
                           torch.stack([cached.mean[i, int(f)] for i, f, _ in expected]))
        assert [s for b in batches for s in b["seed"]] == [s for _, _, s in expected]  # Python ints, in order


class Indices(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, item):
        i, flip, seed = item
        return {"index": i, "flip": flip, "seed": seed}


def test_two_processes_each_get_their_own_share_of_every_epoch(make_cfg):
    """What each process of a 2-process run trains on: the script's dataloader as accelerate
    prepares it for process 0 and 1. train() calls dataloader.set_epoch(epoch), which must reach
    EpochShuffle through accelerate's wrappers, or every epoch would repeat epoch 0's order."""
    from accelerate.data_loader import prepare_data_loader

    cfg = make_cfg("--BATCH_SIZE=2", "--RANDOM_FLIP=True")
    shards = [prepare_data_loader(lce.make_dataloader(Indices(), cfg, cuda=False), num_processes=2, process_index=rank,
                                  put_on_device=False) for rank in (0, 1)]
    seen_by_epoch = []
    for epoch in range(3):
        seen = []
        for loader in shards:
            loader.set_epoch(epoch)
            seen.append([(i, f, s) for b in loader for i, f, s in zip(b["index"].tolist(), b["flip"].tolist(), b["seed"])])
        expected = order(8, cfg.SEED, epoch)
        # batch k of the shared order goes to process k % 2: disjoint halves, together every image once
        assert seen[0] == expected[0:2] + expected[4:6] and seen[1] == expected[2:4] + expected[6:8], (epoch, seen)
        assert len(shards[0]) == len(shards[1]) == 2  # steps per epoch are counted per process
        seen_by_epoch.append(seen)
    assert seen_by_epoch[0] != seen_by_epoch[1] != seen_by_epoch[2]


# ----------------------------------------------------------------------------- a hub dataset, and the run's length
HUB_IMAGES = 8


@pytest.fixture(scope="module")
def hub_dataset(tmp_path_factory):
    """A dataset laid out as on the hub (data/train-*.parquet, images stored as bytes, columns "picture"
    and "caption"), read offline through `datasets.load_dataset` with a cache of its own."""
    import datasets
    from datasets import Dataset, Features, Value

    from tiny import COLOURS, make_shape_image

    root = tmp_path_factory.mktemp("hub")
    names, rows = list(COLOURS), {"picture": [], "caption": []}
    for i in range(HUB_IMAGES):
        colour, background = names[i % 4], names[(i + 1) % 4]
        buf = io.BytesIO()
        make_shape_image(colour, "circle", background, size=(72 + 4 * i, 64)).save(buf, format="PNG")
        rows["picture"].append({"bytes": buf.getvalue(), "path": None})
        rows["caption"].append(f"row {i}: a {colour} circle on a {background} background")
    features = Features({"picture": datasets.Image(), "caption": Value("string")})
    (root / "data").mkdir()
    Dataset.from_dict(rows, features=features).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    with pytest.MonkeyPatch.context() as mp:  # its Arrow cache under this test's folder, not the user's
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(root / "cache"))
        yield str(root), rows


@pytest.fixture(scope="module")
def hub_run(hub_dataset, tiny_args, tmp_path_factory):
    """DATASET_NAME (no DATA_DIR), IMAGE_COLUMN set (no guess fits "picture"), the caption column guessed,
    the first 6 of 8 rows (MAX_TRAIN_SAMPLES), the run's length from NUM_EPOCHS=2 (no MAX_TRAIN_STEPS),
    and OUTPUT_NAME for the WebUI file's name."""
    from conftest import run_main

    return run_main(tiny_args("--DATA_DIR=None", f"--DATASET_NAME={hub_dataset[0]}", "--IMAGE_COLUMN=picture",
                              "--MAX_TRAIN_SAMPLES=6", "--NUM_EPOCHS=2", "--LOG_EVERY=1", "--OUTPUT_NAME=hub_lora",
                              f"--OUTPUT_DIR={tmp_path_factory.mktemp('hub_run') / 'out'}"))


def test_a_hub_dataset_trains_its_first_rows_for_num_epochs(hub_run, hub_dataset):
    _, rows = hub_dataset
    images, captions = lce.load_captioned_images(hub_run.cfg, show_progress=False)
    assert captions == rows["caption"][:6]  # the first six rows, each with its own caption
    for img, stored in zip(images, rows["picture"]):
        assert np.array_equal(np.asarray(to_rgb(img)), np.asarray(Image.open(io.BytesIO(stored["bytes"])).convert("RGB")))
    # 6 images, batch 4: 2 optimizer steps an epoch (4 + 2 images), NUM_EPOCHS=2: 4 steps
    assert "6 images at 64px" in hub_run.log and "2 steps/epoch, 4 steps, 2 epochs" in hub_run.log, hub_run.log
    with open(os.path.join(hub_run.out, "metrics.jsonl")) as f:
        assert [(r["step"], r["epoch"]) for r in map(json.loads, f)] == [(1, 0), (2, 0), (3, 1), (4, 1)]


def test_output_name_names_the_webui_file(hub_run, tiny_model_dir):
    from conftest import fresh_pipe, maxdiff, pipe_outputs, read_safetensors

    assert sorted(n for n in os.listdir(hub_run.out) if n.endswith(".safetensors")) == ["hub_lora.safetensors", lce.WEIGHTS_NAME]
    _, meta = read_safetensors(os.path.join(hub_run.out, "hub_lora.safetensors"))
    assert meta["ss_output_name"] == meta["modelspec.title"] == "hub_lora" and meta["ss_num_train_images"] == "6"
    y = pipe_outputs(fresh_pipe(tiny_model_dir, hub_run.out, weight_name="hub_lora.safetensors"))[0]
    assert maxdiff(y, pipe_outputs(fresh_pipe(tiny_model_dir, hub_run.out))[0]) <= 1e-5  # the same adapter


def test_a_hub_dataset_stays_lazy_and_skips_an_unreadable_row(tmp_path, make_cfg):
    """Five rows, the third not an image: the images come back as a lazy view of rows 0, 1, 3, 4 (each
    decoded when asked, with its own caption), and no decoded picture is held after loading."""
    import gc

    import datasets
    from datasets import Dataset, Features, Value

    from lora_tools.data import HubImages
    from tiny import make_shape_image

    rows = {"image": [], "text": []}
    for i in range(5):
        buf = io.BytesIO()
        make_shape_image("red", "circle", "blue", size=(64 + 8 * i, 64)).save(buf, format="PNG")
        rows["image"].append({"bytes": b"not an image" if i == 2 else buf.getvalue(), "path": None})
        rows["text"].append(f"row {i}")
    (tmp_path / "data").mkdir()
    features = Features({"image": datasets.Image(), "text": Value("string")})
    Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
        images, captions = lce.load_captioned_images(make_cfg("--DATA_DIR=None", f"--DATASET_NAME={tmp_path}"),
                                                     show_progress=False)
        gc.collect()
        held = [o for o in gc.get_objects() if isinstance(o, Image.Image) and o.size[0] * o.size[1] >= 64 * 64]
        assert not held  # no decoded picture is kept (a list of them was, before: 2.2 GB for 300 of 1024²)
        assert isinstance(images, HubImages) and images.rows == [0, 1, 3, 4] and captions == ["row 0", "row 1", "row 3", "row 4"]
        assert to_rgb(images[2]).size == (88, 64)  # row 3's picture, decoded now


def test_a_hub_dataset_column_that_cannot_be_guessed_is_named(hub_dataset, make_cfg):
    with pytest.raises(UserError, match=r"could not tell which column holds the images; the columns are \['caption', 'picture'\]"):
        lce.load_captioned_images(make_cfg("--DATA_DIR=None", f"--DATASET_NAME={hub_dataset[0]}"), show_progress=False)
    with pytest.raises(UserError, match=r"CAPTION_COLUMN='text' is not a column"):
        lce.load_captioned_images(make_cfg("--DATA_DIR=None", f"--DATASET_NAME={hub_dataset[0]}", "--IMAGE_COLUMN=picture",
                                           "--CAPTION_COLUMN=text"), show_progress=False)


def test_a_hub_dataset_offline_and_not_cached_is_one_line_saying_so(make_cfg):
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1 forbids downloading") as e:
        lce.load_captioned_images(make_cfg("--DATA_DIR=None", "--DATASET_NAME=nobody/no-such-dataset"), show_progress=False)
    assert "DATASET_NAME='nobody/no-such-dataset'" in str(e.value) and "\n" not in str(e.value)


def test_metadata_csv_with_a_caption_column_of_its_own(tmp_path, capsys):
    from tiny import make_shape_image

    for i in range(3):
        make_shape_image("red", "square", "blue").save(tmp_path / f"{i}.png")
    (tmp_path / "metadata.csv").write_text('file_name,prompt,notes\n0.png,"a red square, centred",x\n1.png,a red square,y\n'
                                           '2.png,,z\n', encoding="utf-8")
    assert [c for _, c in read_folder(str(tmp_path), log=print)] == ["a red square, centred", "a red square", ""]
    assert "1 image(s)" in capsys.readouterr().out  # 2.png has an empty caption, said once
    assert [c for _, c in read_folder(str(tmp_path), "notes", log=print)] == ["x", "y", "z"]  # --CAPTION_COLUMN=notes
