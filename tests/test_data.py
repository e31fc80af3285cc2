"""Acceptance points 11 and 12: the latent cache gives the loss of the uncached path, its mirrored
orientation is the encoding of the mirrored image, and EpochShuffle's order is a pure function of
(seed, epoch)."""
import pytest
import torch

import lora_complete_example as lce
from conftest import collate, loss_of


@pytest.fixture(scope="module")
def encoders(make_cfg):
    cfg = make_cfg()
    tok, te, vae, unet, sched = lce.load_models(cfg, torch.float32, torch.float32)
    lce.freeze(te, vae, unet)
    lce.add_lora(unet, cfg)
    with torch.no_grad():  # a trained-looking adapter, so the LoRA path is part of the comparison
        g = torch.Generator().manual_seed(0)
        for n, p in unet.named_parameters():
            if ".lora_B." in n:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return tok, te, vae, unet, sched


def datasets(cfg, tok, te, vae):
    images, captions = lce.load_captioned_images(cfg)
    ds = lce.CaptionedImages(images, lce.tokenize(tok, captions), cfg)
    return ds, lce.cache_latents(ds, vae, te, cfg, show_progress=False)


@pytest.mark.parametrize("flip", [False, True])
def test_cached_and_uncached_paths_give_the_same_loss(make_cfg, encoders, flip):
    tok, te, vae, unet, sched = encoders
    cfg = make_cfg(f"--RANDOM_FLIP={flip}", "--BATCH_SIZE=3")
    ds, cached = datasets(cfg, tok, te, vae)
    assert len(ds) == len(cached) == 8
    assert tuple(cached.mean.shape) == (8, 2 if flip else 1, 4, 8, 8)
    idx = [5, 0, 3, 7]
    uncached_batch = collate(ds[(i, flip)] for i in idx)
    cached_batch = collate(cached[(i, flip)] for i in idx)
    assert set(cached_batch) >= {"latent_mean", "latent_std", "text_emb"} and "pixel_values" not in cached_batch
    torch.manual_seed(11)
    loss_uncached = loss_of(uncached_batch, unet, sched, vae, te)
    torch.manual_seed(11)
    # no encoders for the cached batch: it must not need them
    loss_cached = loss_of(cached_batch, unet, sched, None, None, scaling_factor=vae.config.scaling_factor)
    torch.testing.assert_close(loss_cached, loss_uncached, rtol=1e-5, atol=1e-7)
    # and different noise gives a different loss (the comparison is not trivially equal)
    torch.manual_seed(12)
    other = loss_of(cached_batch, unet, sched, None, None, scaling_factor=vae.config.scaling_factor)
    assert abs(other.item() - loss_cached.item()) > 1e-4


def test_loss_does_not_depend_on_the_memory_layout_of_the_latents(make_cfg, encoders):
    """The same values in another memory layout (the VAE's own output is channels-last on the
    CPU, the cache is contiguous) must draw the same noise and give the same loss."""
    tok, te, vae, unet, sched = encoders
    cfg = make_cfg("--RANDOM_FLIP=False", "--BATCH_SIZE=4")
    _, cached = datasets(cfg, tok, te, vae)
    batch = collate(cached[(i, False)] for i in [1, 2, 4, 6])
    channels_last = {k: v.to(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in batch.items()}
    assert torch.equal(channels_last["latent_mean"], batch["latent_mean"])
    sf = vae.config.scaling_factor
    torch.manual_seed(3)
    contiguous_loss = loss_of(batch, unet, sched, None, None, scaling_factor=sf)
    torch.manual_seed(3)
    channels_last_loss = loss_of(channels_last, unet, sched, None, None, scaling_factor=sf)
    torch.testing.assert_close(channels_last_loss, contiguous_loss, rtol=1e-5, atol=1e-7)


def test_cache_orientation_one_is_the_mirrored_image(make_cfg, encoders):
    tok, te, vae, unet, sched = encoders
    cfg = make_cfg("--RANDOM_FLIP=True")
    ds, cached = datasets(cfg, tok, te, vae)
    asymmetric = 0
    for i in range(len(ds)):
        px = ds[(i, False)]["pixel_values"]
        mirrored = ds[(i, True)]["pixel_values"]
        assert torch.equal(mirrored, px.flip(-1))
        mean, std = lce.encode_images(vae, torch.stack([px, mirrored]))
        torch.testing.assert_close(cached[(i, False)]["latent_mean"], mean[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cached[(i, True)]["latent_mean"], mean[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cached[(i, True)]["latent_std"], std[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cached.mean[i, 1], mean[1], rtol=1e-4, atol=1e-5)
        assert torch.equal(cached[(i, True)]["text_emb"], cached[(i, False)]["text_emb"])
        if (mean[0] - mean[1]).abs().max() > 1e-3:
            asymmetric += 1
    assert asymmetric >= len(ds) // 2  # the two orientations really differ for these pictures


def test_cached_text_embeddings_are_the_captions(make_cfg, encoders):
    tok, te, vae, unet, sched = encoders
    cfg = make_cfg("--RANDOM_FLIP=False")
    ds, cached = datasets(cfg, tok, te, vae)
    images, captions = lce.load_captioned_images(cfg)
    expected = lce.encode_text(te, lce.tokenize(tok, captions))
    torch.testing.assert_close(cached.text_emb, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- 12. EpochShuffle
def order(n, seed, epoch, flip=True):
    s = lce.EpochShuffle(n, seed, flip)
    s.set_epoch(epoch)
    return list(s)


def test_same_seed_and_epoch_give_the_same_order():
    assert order(50, 42, 3) == order(50, 42, 3)
    # a resumed run builds a new sampler and jumps to its epoch: the same order as a run that got there
    s = lce.EpochShuffle(50, 42, True)
    for epoch in range(4):
        s.set_epoch(epoch)
        seen = list(s)
    assert seen == order(50, 42, 3)


def test_different_epochs_and_seeds_differ():
    orders = [[i for i, _ in order(50, 42, e)] for e in range(5)]
    assert all(orders[a] != orders[b] for a in range(5) for b in range(a + 1, 5))
    assert [i for i, _ in order(50, 43, 0)] != orders[0]


@pytest.mark.parametrize("n", [1, 7, 50])
def test_every_index_appears_exactly_once_per_epoch(n):
    for epoch in range(3):
        items = order(n, 5, epoch)
        assert len(items) == n == len(lce.EpochShuffle(n, 5, True))
        assert sorted(i for i, _ in items) == list(range(n))


def test_flips_are_per_epoch_and_absent_without_random_flip():
    flips = [f for e in range(4) for _, f in order(50, 42, e)]
    assert 0.3 < sum(flips) / len(flips) < 0.7
    assert [f for _, f in order(50, 42, 1)] != [f for _, f in order(50, 42, 2)]
    assert all(f is False for e in range(3) for _, f in order(50, 42, e, flip=False))
    # without flips, the order is still the seeded permutation
    assert [i for i, _ in order(50, 42, 2, flip=False)] == [i for i, _ in order(50, 42, 2, flip=True)]


def test_dataloader_over_the_cache_sees_each_image_once_per_epoch(make_cfg, encoders):
    tok, te, vae, unet, sched = encoders
    cfg = make_cfg("--RANDOM_FLIP=True", "--BATCH_SIZE=3")
    _, cached = datasets(cfg, tok, te, vae)
    sampler = lce.EpochShuffle(len(cached), cfg.SEED, True)
    loader = torch.utils.data.DataLoader(cached, batch_size=3, sampler=sampler)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        embs = torch.cat([b["text_emb"] for b in loader])
        means = torch.cat([b["latent_mean"] for b in loader])
        expected = order(len(cached), cfg.SEED, epoch)
        assert torch.equal(embs, cached.text_emb[[i for i, _ in expected]])
        assert torch.equal(means, torch.stack([cached.mean[i, int(f)] for i, f in expected]))
