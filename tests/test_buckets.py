"""Aspect-ratio buckets (ASPECT_RATIO_BUCKETING, lora_tools/buckets.py): the bucket table and each picture's
bucket, pictures resized to cover their bucket with their size and crop in the time ids, batches that never
mix sizes, and an exact resume of a run in buckets."""
import json
import os
import re

import pytest
import torch

import lora_complete_example as lce
from conftest import lora_weights, maxdiff, run_main
from lora_tools.buckets import BucketBatches, bucket_table, pick_bucket
from tiny import make_shape_image

pytestmark = pytest.mark.xdist_group("buckets")


def test_the_bucket_table_and_each_pictures_bucket():
    table = bucket_table(512)
    assert (512, 512) in table and (448, 576) in table and (576, 448) in table
    assert all(h % 64 == 0 and w % 64 == 0 and 256 <= min(h, w) and max(h, w) <= 1024 and h * w <= 512 * 512
               for h, w in table)
    assert pick_bucket(1536, 1024, 512) == (384, 640)  # a 3:2 photo: the nearest ratio (5:3), not a square
    assert pick_bucket(1024, 1536, 512) == (640, 384)
    assert pick_bucket(2048, 2048, 512) == (512, 512)
    assert pick_bucket(300, 200, 512) == (192, 256)  # smaller than 512²: its own size, never scaled up
    assert pick_bucket(300, 200, 512, upscale=True) == (384, 640)  # unless asked: a full bucket of its ratio


def test_a_pictures_size_comes_from_its_header_turned_as_exif_says(tmp_path):
    """Buckets are chosen from each file's header (no second decode), as the picture looks on screen."""
    from PIL import Image

    from lora_tools.data import open_image, picture_size

    for orientation in (1, 6):  # 6: stored a quarter turn away, as phones do
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = str(tmp_path / f"{orientation}.jpg")
        Image.new("RGB", (256, 128), "red").save(path, exif=exif)
        assert picture_size(path) == open_image(path).size == ((256, 128) if orientation == 1 else (128, 256))
        with Image.open(path) as im:  # a picture in memory (a hub dataset's row), not yet decoded
            assert picture_size(im) == open_image(path).size


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Ten pictures of three shapes: 4 square (128 x 128), 3 wide (256 x 128), 3 tall (128 x 256)."""
    folder = tmp_path_factory.mktemp("mixed")
    sizes = [(128, 128)] * 4 + [(256, 128)] * 3 + [(128, 256)] * 3
    for i, size in enumerate(sizes):
        make_shape_image(["red", "green", "blue"][i % 3], "circle", "yellow", size=size).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}, a circle")
    return str(folder)


def test_pictures_fill_their_bucket_with_their_size_and_crop_in_the_time_ids(mixed_folder, make_cfg):
    cfg = make_cfg(f"--DATA_DIR={mixed_folder}", "--RESOLUTION=128", "--ASPECT_RATIO_BUCKETING=True")
    images, captions = lce.load_captioned_images(cfg, show_progress=False)
    sizes = lce.bucket_sizes(images, cfg)
    assert sorted(set(sizes)) == [(64, 192), (128, 128), (192, 64)]  # (h, w): square, wide, tall
    ds = lce.CaptionedImages(images, torch.zeros(len(images), 1, 77, dtype=torch.long), cfg, sizes=sizes)
    wide = next(i for i, s in enumerate(sizes) if s == (64, 192))
    item = ds[(wide, False, 0)]
    # 256 x 128 (w x h) scaled by 0.75 to cover 192 x 64: 192 x 96, of which the middle 64 rows are kept
    assert item["pixel_values"].shape == (3, 64, 192)
    assert item["time_ids"].tolist() == [128, 256, 16, 0, 64, 192]  # (original h, w, crop top, left, target h, w)
    assert ds[(wide, True, 0)]["time_ids"].tolist() == [128, 256, 16, 0, 64, 192]  # the full width: mirrored, still 0
    # at 256 px the pictures are smaller than a bucket: they keep their size, unless BUCKET_UPSCALE
    bigger = dict(ASPECT_RATIO_BUCKETING=True, RESOLUTION=256)
    assert set(lce.bucket_sizes(images, cfg.replace(**bigger), log=False)) == {(128, 128), (128, 256), (256, 128)}
    upscaled = cfg.replace(**bigger, BUCKET_UPSCALE=True)
    sizes = lce.bucket_sizes(images, upscaled, log=False)
    assert set(sizes) == {(256, 256), (192, 320), (320, 192)}
    ds = lce.CaptionedImages(images, torch.zeros(len(images), 1, 77, dtype=torch.long), upscaled, sizes=sizes)
    assert ds[(wide, False, 0)]["pixel_values"].shape == (3, 192, 320)


def test_batches_never_mix_bucket_sizes_and_each_epoch_sees_every_picture_once():
    sizes = [(128, 128)] * 5 + [(64, 192)] * 4 + [(192, 64)] * 3
    sampler = lce.EpochShuffle(len(sizes), 42, random_flip=True)
    batches = BucketBatches(sampler, sizes, batch_size=2, seed=42)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        drawn = list(batches)
        assert len(drawn) == len(batches) == 3 + 2 + 2  # per bucket: ceil(n / 2)
        assert all(len({sizes[i] for i, _, _ in batch}) == 1 for batch in drawn)  # one size a batch
        assert sorted(i for batch in drawn for i, _, _ in batch) == list(range(12))
        assert drawn == list(batches)  # a pure function of (seed, epoch): a resume replays it
        epochs.append(drawn)
    assert epochs[0] != epochs[1]


def val_losses(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return {r["step"]: r["val_loss"] for r in map(json.loads, f) if "val_loss" in r}


def test_a_run_in_buckets_trains_resumes_exactly_and_its_validation_loss_falls_and_repeats(mixed_folder, tiny_args, tmp_path):
    """Six steps in buckets, 2 of the 10 pictures held out (VALIDATION_SPLIT), their loss at steps 0, 3 and 6 and
    a checkpoint at 3; then RESUME_FROM=latest: the same final weights, and the same validation loss at step 6
    (fixed noise and timesteps: the same weights give the same value)."""
    argv = tiny_args(f"--DATA_DIR={mixed_folder}", "--RESOLUTION=128", "--ASPECT_RATIO_BUCKETING=True", "--BATCH_SIZE=2",
                     "--MAX_TRAIN_STEPS=6", "--CHECKPOINTING_STEPS=3", "--LOG_EVERY=1", "--VALIDATION_SPLIT=2",
                     "--VALIDATION_LOSS_STEPS=3", "--LEARNING_RATE=1e-2", f"--OUTPUT_DIR={tmp_path / 'out'}")
    full = run_main(argv)
    table = re.search(r"aspect-ratio buckets \(height x width: pictures\): (.*)", full.log).group(1)
    counts = dict(part.split(": ") for part in table.split(", "))
    assert set(counts) == {"128x128", "64x192", "192x64"} and sum(map(int, counts.values())) == 8  # 2 held out
    assert "validation: 2 of 10 images held out" in full.log and "trained 6 steps" in full.log
    val = val_losses(full.out)
    assert list(val) == [0, 3, 6] and val[6] < 0.95 * val[0]  # it learns, on pictures it never trained on
    best = min(val, key=val.get)
    where = {3: os.path.join(full.out, "checkpoint-3"), 6: "the final weights"}.get(best, "no checkpoint")
    assert f"lowest validation loss: {val[best]:.4f} at step {best} ({where}); at the end: {val[6]:.4f}" in full.log
    final = lora_weights(full.out)
    again = run_main(argv + ["--RESUME_FROM=latest"])
    assert re.search(r"resumed from .*checkpoint-3 at step 3", again.log)
    assert max(maxdiff(final[k], v) for k, v in lora_weights(again.out).items()) <= 1e-5
    assert max(maxdiff(final[k], v) for k, v in lora_weights(os.path.join(full.out, "checkpoint-3")).items()) > 1e-4
    assert val_losses(again.out) == pytest.approx(val, rel=1e-5)
