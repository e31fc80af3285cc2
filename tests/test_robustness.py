"""Robustness: what happens when the user, the data, the numbers or the machine misbehave.

1. bad settings fail before any slow work, as one 'error:' line (no traceback)
2. real-world images (grayscale, palette, alpha, CMYK, 16-bit, EXIF-rotated, tiny, huge, broken)
3. divergence: a non-finite loss stops the run and never replaces good weights
4. checkpoints: exact resume mid-epoch, files plain tools can read, retention, 'latest'
5. Ctrl-C / SIGTERM: checkpoint, print the resume command, exit 130 / 143
6. atomic outputs
7. out of GPU memory: a helpful message, exit code 3
8. safe loading: no unpickling of code anywhere in the project

The script runs as a subprocess only where the process boundary is the point (exit codes,
stderr, signals); the rest calls its functions in this process. Subprocess runs: 7, in pairs
where they can overlap.
"""
import ast
import contextlib
import glob
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import lora_complete_example as lce
from conftest import REPO_ROOT, capture_library_messages, key_complaints, subprocess_env
from lora_tools.config import UserError
from lora_tools.data import open_image, read_folder, to_rgb
from lora_tools.files import atomic_path

SCRIPT_NAME = os.path.basename(lce.__file__)  # run as `python lora_complete_example.py` in the repo root
FAST_DEMO = ["--DEMO=True", "--NUM_INFERENCE_STEPS=2"]
OOM_SETTINGS = ("BATCH_SIZE", "GRADIENT_ACCUMULATION_STEPS", "GRADIENT_CHECKPOINTING", "RESOLUTION",
                "USE_8BIT_ADAM", "MIXED_PRECISION")


# ----------------------------------------------------------------------------- helpers
def run_script(args, timeout=300):
    """`python lora_complete_example.py ARGS` in the repo root, offline; (result, seconds)."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, SCRIPT_NAME, *args], cwd=REPO_ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t0


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_clean_user_error(r, *words):
    """Non-zero exit, exactly one line starting with 'error:' on stderr naming `words`, no traceback."""
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]
    errors = error_lines(r.stderr)
    assert len(errors) == 1, f"expected one line starting with 'error:' on stderr, got:\n{r.stderr[-3000:]!r}"
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run_main(argv):
    """lce.main(argv) in this process; returns what it printed on stdout."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            lce.main(argv)
    finally:
        reset_accelerate()
    return out.getvalue()


def run_main_recorded(argv):
    """(stdout, exception or None): for fixtures whose files are checked even if a later stage of
    main (pictures, reports) fails; a separate test asserts that the runs completed."""
    out = io.StringIO()
    error = None
    try:
        with contextlib.redirect_stdout(out):
            lce.main(argv)
    except Exception as e:  # noqa: BLE001 -- reported by the *_complete tests
        error = e
    finally:
        reset_accelerate()
    return out.getvalue(), error


def leftovers(folder):
    """Temporary files/folders of interrupted atomic writes (atomic_path's .tmp-*, checkpoints' .checkpoint-*)."""
    found = []
    for root, dirs, files in os.walk(folder):
        found += [os.path.join(root, n) for n in dirs + files if n.startswith((".tmp-", ".checkpoint-", ".write-test-"))]
    return found


def base_argv(model_dir, data_dir, *extra):
    """The DEMO settings, spelled out, on the conftest tiny model and data (for in-process runs)."""
    return [f"--MODEL_ID={model_dir}", f"--DATA_DIR={data_dir}", "--RESOLUTION=64", "--MIXED_PRECISION=no",
            "--LEARNING_RATE=1e-3", "--LOG_EVERY=5", "--NUM_INFERENCE_STEPS=2", *extra]


def lora_tensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def file_bytes(folder):
    """{relative path: bytes} of every file under folder."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def checkpoint_names(folder):
    return sorted((n for n in os.listdir(folder) if n.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1]))


def folder_cfg(folder, *extra):
    return lce.resolve_config([f"--DATA_DIR={folder}", "--RESOLUTION=64", "--MIXED_PRECISION=no", *extra])


def forbid_model_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("load_models was called: the mistake was not caught before the slow work")

    monkeypatch.setattr(lce, "load_models", fail)


# =============================================================================
# 1. Validation before slow work
# =============================================================================
@pytest.mark.parametrize("arg, words", [
    ("--LORA_RANK=0", ["LORA_RANK", "0"]),
    ("--LEARNING_RATE=0", ["LEARNING_RATE", "> 0"]),
    ("--LEARNING_RATE=-1", ["LEARNING_RATE", "-1"]),
    ("--RESOLUTION=500", ["RESOLUTION", "500", "512", "multiple of 8"]),
    ("--BATCH_SIZE=0", ["BATCH_SIZE", "0"]),
    ("--MIXED_PRECISION=fp8", ["MIXED_PRECISION", "fp8", "bf16"]),
])
def test_bad_setting_is_a_one_line_user_error(arg, words):
    with pytest.raises(UserError) as e:
        lce.resolve_config([arg])
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message


def test_fp16_on_a_cpu_is_refused_with_the_fix():
    with pytest.raises(UserError, match=r"fp16.*CUDA.*--MIXED_PRECISION=no"):
        lce.resolve_mixed_precision("fp16", cuda=False)


def test_check_paths_names_a_missing_data_dir(tmp_path, tiny_model_dir):
    missing = str(tmp_path / "my_photos")
    cfg = lce.resolve_config([f"--MODEL_ID={tiny_model_dir}", f"--DATA_DIR={missing}"])
    with pytest.raises(UserError, match="DATA_DIR") as e:
        lce.check_paths(cfg)
    assert missing in str(e.value)


@pytest.mark.parametrize("model_id", ["./no-such-model", "/nonexistent/models/sd15", "no-such-model"])
def test_check_paths_refuses_a_missing_local_model_folder(model_id):
    cfg = lce.resolve_config([f"--MODEL_ID={model_id}"])
    with pytest.raises(UserError, match="MODEL_ID") as e:
        lce.check_paths(cfg)
    assert model_id in str(e.value) and "unet" in str(e.value)


def test_check_paths_accepts_a_real_model_folder_and_a_hub_id(tiny_model_dir, tiny_data_dir):
    lce.check_paths(lce.resolve_config([f"--MODEL_ID={tiny_model_dir}", f"--DATA_DIR={tiny_data_dir}"]))
    lce.check_paths(lce.resolve_config(["--MODEL_ID=someone/some-model"]))  # checked when loading


def test_hub_id_offline_says_offline_and_cache(make_cfg, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_cfg("--MODEL_ID=nobody-here/not-a-real-model-xyz")
    lce.check_paths(cfg)  # a hub id passes the path check...
    with pytest.raises(UserError) as e:  # ...and loading it offline explains why it cannot work
        lce.load_models(cfg, torch.float32, torch.float32)
    message = str(e.value)
    assert "nobody-here/not-a-real-model-xyz" in message and "\n" not in message
    assert "offline" in message.lower() or "HF_HUB_OFFLINE" in message
    assert "cache" in message


def test_unknown_target_module_lists_the_attention_projections(tiny_model_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    lce.check_target_modules(unet, ["to_q", "to_k", "to_v", "to_out.0"])  # the defaults match
    with pytest.raises(UserError) as e:
        lce.check_target_modules(unet, ["to_q", "to_x"])
    message = str(e.value)
    assert "to_x" in message and "TARGET_MODULES" in message and "\n" not in message
    for projection in ("to_q", "to_k", "to_v", "to_out.0"):
        assert f"'{projection}'" in message, message


def test_output_dir_that_cannot_be_created_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    target = str(blocker / "lora_out")  # its parent is a regular file: not even root can create it
    with pytest.raises(UserError, match="OUTPUT_DIR") as e:
        lce.check_output_dir(target)
    assert target in str(e.value) and "writable" in str(e.value)
    assert blocker.read_text() == "not a folder"
    lce.check_output_dir(str(tmp_path / "fine" / "nested"))  # a creatable folder is fine


@pytest.mark.parametrize("case", ["missing DATA_DIR", "empty DATA_DIR", "unknown CAPTION_COLUMN",
                                  "missing MODEL_ID folder", "unwritable OUTPUT_DIR", "RESUME_FROM not a checkpoint"])
def test_main_stops_on_a_mistake_before_loading_any_model(case, tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch):
    """main's order: every one of these fails before load_models (the first slow step) runs."""
    forbid_model_loading(monkeypatch)
    data, model, out, extra = tiny_data_dir, tiny_model_dir, str(tmp_path / "out"), []
    if case == "missing DATA_DIR":
        data, expected = str(tmp_path / "no_such_photos"), [str(tmp_path / "no_such_photos")]
    elif case == "empty DATA_DIR":
        data = str(tmp_path / "empty_photos")
        os.makedirs(data)
        (tmp_path / "empty_photos" / "readme.md").write_text("photos go here")
        expected = [data, "no images"]
    elif case == "unknown CAPTION_COLUMN":
        extra, expected = ["--CAPTION_COLUMN=caption"], ["CAPTION_COLUMN", "'caption'", "'text'"]
    elif case == "missing MODEL_ID folder":
        model = str(tmp_path / "no_model")
        expected = ["MODEL_ID", model]
    elif case == "unwritable OUTPUT_DIR":
        (tmp_path / "file").write_text("x")
        out = str(tmp_path / "file" / "out")
        expected = ["OUTPUT_DIR", out]
    else:
        os.makedirs(tmp_path / "not_a_checkpoint")
        extra = [f"--RESUME_FROM={tmp_path / 'not_a_checkpoint'}"]
        expected = ["RESUME_FROM", str(tmp_path / "not_a_checkpoint"), "checkpoint"]
    argv = base_argv(model, data, f"--OUTPUT_DIR={out}", "--MAX_TRAIN_STEPS=2", *extra)
    with pytest.raises(UserError) as e:
        run_main(argv)
    message = str(e.value)
    assert "\n" not in message
    for w in expected:
        assert w in message, message


def test_command_line_bad_value_exits_with_one_error_line(tmp_path):
    out = tmp_path / "out"
    r, _ = run_script(["--LORA_RANK=0", f"--OUTPUT_DIR={out}"])
    assert_clean_user_error(r, "LORA_RANK")
    assert not out.exists()


def test_command_line_missing_data_dir_fails_before_model_loading(tmp_path):
    missing = str(tmp_path / "photos_that_do_not_exist")
    r, seconds = run_script([*FAST_DEMO, f"--DATA_DIR={missing}", f"--OUTPUT_DIR={tmp_path / 'out'}"])
    assert_clean_user_error(r, "DATA_DIR", missing)
    everything = r.stdout + r.stderr
    for sign_of_slow_work in ("Loading", "checking images", "trainable LoRA", "caching latents", "training:"):
        assert sign_of_slow_work not in everything, everything[-3000:]
    assert seconds < 120


# =============================================================================
# 2. Real-world images
# =============================================================================
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
        px = ds[(0, flip)]["pixel_values"]
        assert px.shape == (3, cfg.RESOLUTION, cfg.RESOLUTION) and px.dtype == torch.float32
        assert torch.isfinite(px).all() and px.min() >= -1 and px.max() <= 1


def write_valid_image(path, fmt, size=(96, 80)):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)


def write_truncated(path, fmt):
    buf = io.BytesIO()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(buf, format=fmt)
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def test_broken_files_are_skipped_with_a_warning_and_a_count(tmp_path, capsys):
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
    cfg = folder_cfg(str(d))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, captions = lce.load_captioned_images(cfg, show_progress=False)
    messages = [str(w.message) for w in caught]
    for bad in ("cut.png", "cut.jpg", "fake.jpg"):
        assert sum(bad in m for m in messages) == 1, (bad, messages)
    assert not any("notes.md" in m for m in messages)
    assert [os.path.basename(p) for p in images] == ["good1.png", "good2.jpg"]
    assert captions == ["a photo called good1", "a photo called good2"]
    printed = capsys.readouterr().out
    assert re.search(r"skipped 3 unreadable image\(s\) of 5; training on 2", printed), printed


def test_only_unreadable_images_is_a_user_error(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    write_truncated(d / "cut.jpg", "JPEG")
    (d / "fake.png").write_bytes(b"\x00" * 100)
    cfg = folder_cfg(str(d))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError, match=r"none of the 2 images") as e:
            lce.load_captioned_images(cfg, show_progress=False)
    assert str(d) in str(e.value)


def test_image_without_caption_warns_and_trains_with_an_empty_caption(tmp_path):
    from lora_tools.demo import _tiny_tokenizer

    d = tmp_path / "photos"
    d.mkdir()
    write_valid_image(d / "a.png", "PNG")
    write_valid_image(d / "b.png", "PNG")
    (d / "a.txt").write_text("a dog on a beach\n")
    (d / "notes.md").write_text("ignore me")
    with pytest.warns(UserWarning) as caught:
        images, captions = lce.load_captioned_images(folder_cfg(str(d)), show_progress=False)
    no_caption = [str(w.message) for w in caught if "no caption" in str(w.message)]
    assert len(no_caption) == 1 and str(d / "b.png") in no_caption[0], no_caption
    assert [os.path.basename(p) for p in images] == ["a.png", "b.png"]
    assert captions == ["a dog on a beach", ""]
    ds = lce.CaptionedImages(images, lce.tokenize(_tiny_tokenizer(), captions), folder_cfg(str(d)))
    item = ds[1]
    assert item["pixel_values"].shape == (3, 64, 64) and item["input_ids"].shape == (77,)


def test_read_folder_ignores_non_image_files(tmp_path):
    write_valid_image(tmp_path / "x.png", "PNG")
    (tmp_path / "x.txt").write_text("caption x")
    for name in ("notes.md", "data.json", "Thumbs.db", ".DS_Store"):
        (tmp_path / name).write_text("junk")
    assert read_folder(str(tmp_path)) == [(os.path.normpath(str(tmp_path / "x.png")), "caption x")]


def test_long_captions_are_truncated_with_one_warning():
    from lora_tools.demo import _tiny_tokenizer

    tok = _tiny_tokenizer()  # one token per character
    captions = ["a" * 100, "short", "b" * 300, "c" * 75]  # 75 characters + start + end = exactly 77 tokens
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = lce.tokenize(tok, captions)
    about_length = [str(w.message) for w in caught if "77" in str(w.message) or "long" in str(w.message)]
    assert len(about_length) == 1, about_length
    assert "2 caption(s)" in about_length[0]
    assert ids.shape == (4, 77)
    assert ids[0, 0].item() == tok.bos_token_id and ids[0, -1].item() == tok.eos_token_id  # cut, still well-formed
    assert ids[2, -1].item() == tok.eos_token_id


def test_long_captions_give_the_user_one_message_not_a_misleading_library_one():
    """transformers logs 'Token indices sequence length is longer than the specified maximum ...
    will result in indexing errors' when the lengths are measured without truncation — wrong here,
    since tokenize then cuts them, and a second message about the same thing."""
    from lora_tools.demo import _tiny_tokenizer

    tok = _tiny_tokenizer()
    with capture_library_messages() as messages:
        lce.tokenize(tok, ["a" * 100, "short"])
    about_length = [m for m in messages if re.search(r"77|longer|sequence length", m)]
    assert len(about_length) == 1, about_length


# =============================================================================
# 3 and 6. Divergence never overwrites good weights; atomic writes
# =============================================================================
def prepare_good_output_dir(out):
    """An OUTPUT_DIR as an earlier good run left it: an adapter, its config and a checkpoint."""
    from safetensors.torch import save_file

    (out / "checkpoint-3").mkdir(parents=True)
    save_file({"unet.known": torch.arange(6, dtype=torch.float32)}, str(out / lce.WEIGHTS_NAME))
    (out / "training_config.json").write_text('{"from": "an earlier good run"}\n')
    for name, data in (("pytorch_lora_weights.safetensors", b"earlier lora"), ("training_state.pt", b"state"),
                       ("training_config.json", b"{}")):
        (out / "checkpoint-3" / name).write_bytes(data)
    return file_bytes(str(out))


@pytest.fixture(scope="module")
def diverged_run(failing_runs):
    """A demo run at LEARNING_RATE=1e30 into a folder that already holds a good adapter and a checkpoint."""
    return failing_runs["diverge"]


def test_divergence_exits_nonzero_naming_learning_rate(diverged_run):
    r, _, _ = diverged_run
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert re.search(r"error: training diverged.*LEARNING_RATE", r.stderr), r.stderr[-3000:]


def test_divergence_error_is_one_line_of_its_own(diverged_run):
    """The progress bar must end its line before the error: on a terminal 'error: ...' should start a line."""
    r, _, _ = diverged_run
    assert_clean_user_error(r, "LEARNING_RATE")


def test_divergence_leaves_existing_weights_and_checkpoints_byte_identical(diverged_run):
    _, out, before = diverged_run
    after = file_bytes(out)
    for name, data in before.items():
        assert after.get(name) == data, f"{name} was changed or removed by the failed run"
    assert leftovers(out) == []
    assert not any(n.startswith("checkpoint-") and n != "checkpoint-3" for n in os.listdir(out))


@pytest.fixture
def lora_unet(make_cfg, tiny_model_dir):
    from diffusers import UNet2DConditionModel

    cfg = make_cfg()
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    lce.freeze(unet)
    lce.add_lora(unet, cfg)
    return unet, cfg


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_save_lora_refuses_non_finite_weights_and_keeps_the_old_file(lora_unet, tmp_path, bad):
    unet, cfg = lora_unet
    path = str(tmp_path / lce.WEIGHTS_NAME)
    lce.save_lora(path, unet, cfg)  # a good file first
    good = open(path, "rb").read()
    name, p = next((n, p) for n, p in unet.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        p.view(-1)[0] = bad
    with pytest.raises(UserError, match="LEARNING_RATE") as e:
        lce.save_lora(path, unet, cfg)
    assert "\n" not in str(e.value)
    assert open(path, "rb").read() == good
    assert os.listdir(tmp_path) == [lce.WEIGHTS_NAME]  # no temporary file left behind


def test_atomic_path_failure_midway_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"old complete file")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(str(target)) as tmp:
            assert os.path.dirname(tmp) == str(tmp_path)  # same folder: the rename is atomic
            with open(tmp, "wb") as f:
                f.write(b"half a new fi")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old complete file"
    assert os.listdir(tmp_path) == ["weights.safetensors"]


def test_atomic_path_failure_creates_nothing_and_success_replaces(tmp_path):
    target = tmp_path / "new.png"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(str(target)) as tmp:
            open(tmp, "wb").write(b"partial")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
    with atomic_path(str(target)) as tmp:
        open(tmp, "wb").write(b"complete")
    assert target.read_bytes() == b"complete" and os.listdir(tmp_path) == ["new.png"]


# =============================================================================
# 4. Checkpoints and exact resume
# =============================================================================
# 8 images, BATCH_SIZE=3 -> 3 micro-batches per epoch; GRADIENT_ACCUMULATION_STEPS=2 -> 2 optimizer
# steps per epoch (the last one on a single micro-batch). A checkpoint at an odd step is mid-epoch.
RESUME_ARGS = ["--BATCH_SIZE=3", "--GRADIENT_ACCUMULATION_STEPS=2", "--LORA_DROPOUT=0.1", "--MAX_TRAIN_STEPS=20",
               "--CHECKPOINTING_STEPS=7"]


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    """Run A: 20 steps, checkpoints at 7 and 14. Run B: the same settings, resumed from A's
    checkpoint-7 (mid-epoch 3) into another folder."""
    root = tmp_path_factory.mktemp("resume")
    a, b = str(root / "A"), str(root / "B")
    argv = base_argv(tiny_model_dir, tiny_data_dir, *RESUME_ARGS)
    log_a, error_a = run_main_recorded(argv + [f"--OUTPUT_DIR={a}"])
    log_b, error_b = run_main_recorded(argv + [f"--OUTPUT_DIR={b}", f"--RESUME_FROM={os.path.join(a, 'checkpoint-7')}"])
    return dict(a=a, b=b, argv=argv, log_a=log_a, log_b=log_b, root=root, errors=[error_a, error_b])


def test_full_and_resumed_runs_complete(resume_runs):
    assert resume_runs["errors"] == [None, None]


def test_resumed_run_ends_with_the_same_weights(resume_runs):
    assert "2 steps/epoch" in resume_runs["log_a"]
    assert re.search(r"resumed from .*checkpoint-7 at step 7", resume_runs["log_b"]), resume_runs["log_b"]
    a = lora_tensors(os.path.join(resume_runs["a"], lce.WEIGHTS_NAME))
    b = lora_tensors(os.path.join(resume_runs["b"], lce.WEIGHTS_NAME))
    ckpt = lora_tensors(os.path.join(resume_runs["a"], "checkpoint-7", lce.WEIGHTS_NAME))
    assert max_abs_diff(a, ckpt) > 1e-4  # steps 8-20 really trained something
    assert max_abs_diff(a, b) <= 1e-5


def test_checkpoint_folder_is_readable_by_plain_tools(resume_runs, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    ckpt = os.path.join(resume_runs["a"], "checkpoint-7")
    assert checkpoint_names(resume_runs["a"]) == ["checkpoint-7", "checkpoint-14"]
    assert {"pytorch_lora_weights.safetensors", "training_config.json", "training_state.pt"} <= set(os.listdir(ckpt))
    assert leftovers(resume_runs["a"]) == []  # no half-written checkpoint or file
    state = torch.load(os.path.join(ckpt, "training_state.pt"), map_location="cpu", weights_only=True)
    assert state["position"]["global_step"] == 7
    assert {"optimizer", "lr_scheduler", "rng"} <= set(state)
    with open(os.path.join(ckpt, "training_config.json")) as f:
        config = json.load(f)
    assert config["LORA_RANK"] == 4 and config["BATCH_SIZE"] == 3 and config["LORA_DROPOUT"] == 0.1
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    with capture_library_messages() as messages:
        pipe.load_lora_weights(ckpt)
    assert key_complaints(messages) == [], messages
    loaded = {n: p.detach() for n, p in pipe.unet.named_parameters() if "lora_" in n}
    saved = lora_tensors(os.path.join(ckpt, lce.WEIGHTS_NAME))
    assert len(loaded) == len(saved) > 0


def test_resume_with_a_different_rank_is_a_clear_error(resume_runs):
    out = str(resume_runs["root"] / "rank8")
    ckpt = os.path.join(resume_runs["a"], "checkpoint-7")
    with pytest.raises(UserError) as e:
        run_main(resume_runs["argv"] + [f"--OUTPUT_DIR={out}", f"--RESUME_FROM={ckpt}", "--LORA_RANK=8"])
    message = str(e.value)
    assert "LORA_RANK" in message and "4" in message and "8" in message and "\n" not in message
    assert not os.path.exists(os.path.join(out, lce.WEIGHTS_NAME))


def test_resume_from_a_non_checkpoint_folder_is_a_clear_error(resume_runs):
    from lora_tools.checkpoint import resolve_resume

    for not_a_checkpoint in (resume_runs["a"], os.path.join(resume_runs["root"], "nowhere")):
        with pytest.raises(UserError, match="RESUME_FROM") as e:
            resolve_resume(not_a_checkpoint, resume_runs["b"])
        assert not_a_checkpoint in str(e.value)


@pytest.fixture(scope="module")
def limited_runs(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    """Run C: 10 steps, a checkpoint every 3, keep 2. Run D: RESUME_FROM=latest in C's folder."""
    out = str(tmp_path_factory.mktemp("limit") / "C")
    argv = base_argv(tiny_model_dir, tiny_data_dir, "--BATCH_SIZE=3", "--GRADIENT_ACCUMULATION_STEPS=2",
                     "--LORA_DROPOUT=0.1", "--MAX_TRAIN_STEPS=10", "--CHECKPOINTING_STEPS=3",
                     "--CHECKPOINTS_TOTAL_LIMIT=2", f"--OUTPUT_DIR={out}")
    _, error_c = run_main_recorded(argv)
    after_c = dict(checkpoints=checkpoint_names(out), leftovers=leftovers(out),
                   weights=lora_tensors(os.path.join(out, lce.WEIGHTS_NAME)))
    log_d, error_d = run_main_recorded(argv + ["--RESUME_FROM=latest"])
    return dict(out=out, after_c=after_c, log_d=log_d, weights_d=lora_tensors(os.path.join(out, lce.WEIGHTS_NAME)),
                errors=[error_c, error_d])


def test_limited_and_latest_runs_complete(limited_runs):
    assert limited_runs["errors"] == [None, None]


def test_checkpoints_total_limit_keeps_the_newest(limited_runs):
    assert limited_runs["after_c"]["checkpoints"] == ["checkpoint-6", "checkpoint-9"]
    assert limited_runs["after_c"]["leftovers"] == []


def test_resume_from_latest_picks_the_newest_and_continues_exactly(limited_runs):
    from lora_tools.checkpoint import resolve_resume

    out = limited_runs["out"]
    assert resolve_resume("latest", out) == os.path.join(out, "checkpoint-9")
    assert re.search(r"resumed from .*checkpoint-9 at step 9", limited_runs["log_d"]), limited_runs["log_d"]
    assert max_abs_diff(limited_runs["after_c"]["weights"], limited_runs["weights_d"]) <= 1e-5  # step 9 is mid-epoch
    assert checkpoint_names(out) == ["checkpoint-6", "checkpoint-9"]


def test_latest_with_no_checkpoint_starts_fresh(tmp_path):
    from lora_tools.checkpoint import resolve_resume

    assert resolve_resume("latest", str(tmp_path)) is None
    (tmp_path / "checkpoint-5").mkdir()  # incomplete: no training_state.pt
    assert resolve_resume("latest", str(tmp_path)) is None


# =============================================================================
# 5. Ctrl-C and SIGTERM
# =============================================================================
class Watched:
    """A demo training run in a subprocess whose merged output is collected by a thread."""

    def __init__(self, out_dir):
        env = subprocess_env()
        env["PYTHONUNBUFFERED"] = "1"
        self.args = [*FAST_DEMO, "--MAX_TRAIN_STEPS=5000", "--CHECKPOINTING_STEPS=None", f"--OUTPUT_DIR={out_dir}"]
        self.proc = subprocess.Popen([sys.executable, SCRIPT_NAME, *self.args], cwd=REPO_ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.chunks, self.lock = [], threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        fd = self.proc.stdout.fileno()
        while True:
            data = os.read(fd, 65536)
            if not data:
                return
            with self.lock:
                self.chunks.append(data)

    def text(self):
        with self.lock:
            return b"".join(self.chunks).decode("utf-8", "replace")

    def wait_for_training(self, timeout=240):
        """Until the progress bar shows at least one finished optimizer step."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(r"training:\s+\d+%\|[^|]*\|\s*[1-9]\d*/5000", self.text()):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"training did not start:\n{self.text()[-3000:]}")

    def finish(self, timeout=60):
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the run did not stop within {timeout}s of the signal:\n{self.text()[-3000:]}")
        self.thread.join(timeout=10)
        return rc, self.text()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """Two demo runs of 5000 steps, started together; once each has trained a step, one gets SIGINT
    (Ctrl-C), the other SIGTERM (what `kill`, Slurm and docker stop send). {signal: (rc, output, OUTPUT_DIR, args)}"""
    sigs = (signal.SIGINT, signal.SIGTERM)
    outs = {s: tmp_path_factory.mktemp(s.name.lower()) / "out" for s in sigs}
    runs = {s: Watched(outs[s]) for s in sigs}
    results = {}
    try:
        for s in sigs:
            runs[s].wait_for_training()
            runs[s].proc.send_signal(s)
        for s in sigs:
            rc, text = runs[s].finish()
            results[s] = (rc, text, outs[s], runs[s].args)
    finally:
        for run in runs.values():
            run.kill()
    return results


def parse_stop(text, out):
    m = re.search(r"stopped at step (\d+); resume with:\s*\n\s*(.+)", text)
    assert m, text[-3000:]
    step, command = int(m.group(1)), m.group(2).strip()
    assert "--RESUME_FROM=" in command
    ckpt = out / f"checkpoint-{step}"
    assert ckpt.is_dir(), os.listdir(out)
    assert {"pytorch_lora_weights.safetensors", "training_config.json", "training_state.pt"} <= set(os.listdir(ckpt))
    return step, command


def test_ctrl_c_checkpoints_prints_the_resume_command_and_it_works(interrupted):
    rc, text, out, args = interrupted[signal.SIGINT]
    assert rc == 130, text[-3000:]
    assert "Traceback" not in text
    step, command = parse_stop(text, out)
    assert step >= 1
    resume = shlex.split(command)
    assert resume[:2] == ["python", SCRIPT_NAME] and f"--RESUME_FROM={out / f'checkpoint-{step}'}" in resume
    assert [a for a in resume[2:] if not a.startswith("--RESUME_FROM=")] == args  # every setting kept
    resume = [a if not a.startswith("--MAX_TRAIN_STEPS=") else f"--MAX_TRAIN_STEPS={step + 2}" for a in resume[2:]]
    r, _ = run_script(resume)
    assert re.search(rf"resumed from .*checkpoint-{step} at step {step}\b", r.stdout), r.stdout[-3000:] + r.stderr[-3000:]
    assert f"trained {step + 2} steps" in r.stdout
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / lce.WEIGHTS_NAME).is_file() and (out / "test_generation.png").is_file()


def test_sigterm_checkpoints_and_exits_143(interrupted):
    rc, text, out, _ = interrupted[signal.SIGTERM]
    assert rc == 143, text[-3000:]
    assert "Traceback" not in text
    step, _ = parse_stop(text, out)
    state = torch.load(out / f"checkpoint-{step}" / "training_state.pt", map_location="cpu", weights_only=True)
    assert state["position"]["global_step"] == step
    assert not (out / lce.WEIGHTS_NAME).exists()  # stopped runs leave only the checkpoint


# =============================================================================
# 7. Out of GPU memory
# =============================================================================
OOM_DRIVER = textwrap.dedent("""
    import runpy, sys
    import torch, torch.nn.functional

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    # the script does `from torch.nn.functional import mse_loss`, so this reaches its training step
    torch.nn.functional.mse_loss = out_of_memory
    sys.argv = [{script!r}, *{args!r}]
    runpy.run_path({script!r}, run_name="__main__")
""")


@pytest.fixture(scope="module")
def failing_runs(tmp_path_factory):
    """The divergence run and the out-of-memory run, started together (the 2 cores overlap their imports)."""
    diverge_out = tmp_path_factory.mktemp("diverge") / "out"
    before = prepare_good_output_dir(diverge_out)
    oom_out = tmp_path_factory.mktemp("oom") / "out"
    code = OOM_DRIVER.format(script=SCRIPT_NAME, args=[*FAST_DEMO, "--MAX_TRAIN_STEPS=5", f"--OUTPUT_DIR={oom_out}"])
    commands = {"diverge": [sys.executable, SCRIPT_NAME, *FAST_DEMO, "--MAX_TRAIN_STEPS=10", "--LEARNING_RATE=1e30",
                            "--CHECKPOINTING_STEPS=None", f"--OUTPUT_DIR={diverge_out}"],
                "oom": [sys.executable, "-c", code]}
    procs = {k: subprocess.Popen(c, cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for k, c in commands.items()}
    results = {}
    try:
        for k, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            results[k] = subprocess.CompletedProcess(commands[k], proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {"diverge": (results["diverge"], str(diverge_out), before), "oom": results["oom"]}


@pytest.fixture(scope="module")
def oom_run(failing_runs):
    return failing_runs["oom"]


def test_out_of_memory_exits_3_with_the_settings_to_change(oom_run):
    r = oom_run
    assert r.returncode == 3, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]
    m = re.search(r"error: (.*out of GPU memory.*)", r.stderr)
    assert m, r.stderr[-3000:]
    for name in OOM_SETTINGS:
        assert name in m.group(1), name


def test_out_of_memory_error_is_one_line_of_its_own(oom_run):
    assert_clean_user_error(oom_run, *OOM_SETTINGS)


# =============================================================================
# 8. Safe loading
# =============================================================================
def project_sources():
    files = [lce.__file__, *glob.glob(os.path.join(REPO_ROOT, "lora_tools", "*.py")),
             *glob.glob(os.path.join(REPO_ROOT, "benchmarks", "*.py"))]
    return sorted(os.path.abspath(f) for f in files)


def dotted(node):
    """`a.b.c` of a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def resolved_call_names(tree):
    """(call node, fully qualified name) for every call, following `import x as y` / `from x import y`."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            if name:
                head, _, rest = name.partition(".")
                full = aliases.get(head, head) + ("." + rest if rest else "")
                yield node, full


def test_no_code_is_unpickled_anywhere():
    files = project_sources()
    assert lce.__file__ in files and any(f.endswith("checkpoint.py") for f in files)
    problems, torch_loads = [], 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        where = os.path.relpath(path, REPO_ROOT)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(m.split(".")[0] in ("pickle", "cPickle", "dill", "_pickle") for m in mods):
                    problems.append(f"{where}:{node.lineno} imports pickle")
        for call, name in resolved_call_names(tree):
            kw = {k.arg: k.value for k in call.keywords if k.arg}
            if name == "torch.load":
                torch_loads += 1
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    problems.append(f"{where}:{call.lineno} torch.load without weights_only=True")
            if name.split(".")[0] in ("pickle", "dill", "_pickle") and name.split(".")[-1] in ("load", "loads", "Unpickler"):
                problems.append(f"{where}:{call.lineno} {name}")
            v = kw.get("trust_remote_code")
            if v is not None and not (isinstance(v, ast.Constant) and v.value is False):
                problems.append(f"{where}:{call.lineno} trust_remote_code={ast.unparse(v)}")
        for node in ast.walk(tree):  # trust_remote_code in a {...} passed on as **kwargs (dict(...) is a call, above)
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and not (
                            isinstance(v, ast.Constant) and v.value is False):
                        problems.append(f"{where}:{node.lineno} trust_remote_code in a dict")
    assert torch_loads >= 1, "the scan found no torch.load at all: it is not looking at the right files"
    assert problems == []
