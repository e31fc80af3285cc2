"""Training (section 6), observed on the script's own run (lce.main on the tiny model): only LoRA
tensors train, each of them does, the loss falls, clipping acts at every optimizer step, the saved files
hold exactly the trained tensors and reload into a fresh diffusers pipeline as the trained model
(α != r), gradient accumulation is exactly a larger batch; the frozen weights stay bit-identical through
the real training loop. Then the loss itself: Min-SNR-γ, offset noise, v-prediction, gradient checkpointing."""
import json
import math
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_complete_example as lce
from conftest import (WEBUI_NAME, assert_close, capture_library_messages, collate_items, fresh_pipe, key_complaints,
                      lora_weights, maxdiff, pipe_outputs, read_safetensors, run_main, tol)
from lora_tools.checkpoint import load_checkpoint

RANK, ALPHA, STEPS, MAX_GRAD_NORM = 4, 8, 40, 0.01


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_args):
    """The script's run: r=4, α=8, the text encoder trained too, gradient accumulation, a high learning rate,
    a MAX_GRAD_NORM small enough that clipping acts at every step, every step logged, a checkpoint half-way."""
    out = str(tmp_path_factory.mktemp("trained") / "out")
    return run_main(tiny_args(f"--OUTPUT_DIR={out}", f"--LORA_RANK={RANK}", f"--LORA_ALPHA={ALPHA}",
                              f"--MAX_GRAD_NORM={MAX_GRAD_NORM}", "--LEARNING_RATE=1e-2", f"--MAX_TRAIN_STEPS={STEPS}",
                              "--BATCH_SIZE=2", "--GRADIENT_ACCUMULATION_STEPS=2", "--TRAIN_TEXT_ENCODER=True",
                              "--LOG_EVERY=1", f"--CHECKPOINTING_STEPS={STEPS // 2}"))


def trained_model(run, folder, trainable):
    """The model a run trained, built without the script's loading code: the base model from disk, PEFT
    adapters with the run's settings, then the trained tensors (a checkpoint's, by parameter name)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(run.cfg.MODEL_ID, safety_checker=None)
    lce.add_lora(pipe.unet, run.cfg, run.cfg.TARGET_MODULES)
    lce.add_lora(pipe.text_encoder, run.cfg, run.cfg.TEXT_ENCODER_TARGET_MODULES, "TEXT_ENCODER_TARGET_MODULES")
    params = {f"{name}.{n}": p for name, m in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder))
              for n, p in m.named_parameters() if p.requires_grad}
    assert params.keys() == trainable.keys()
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(trainable[n])
    return pipe


# ----------------------------------------------------------------------------- what trains
def test_only_the_lora_tensors_train_and_every_one_of_them_moved(trained_run):
    state = load_checkpoint(os.path.join(trained_run.out, f"checkpoint-{STEPS // 2}"))
    trainable = state["trainable"]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)  # nothing else trains
    assert any(n.startswith("text_encoder.") for n in trainable)
    # the optimizer holds exactly these tensors: no frozen weight gets a step or weight decay
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == len(trainable)
    assert all(v.dtype == torch.float32 for v in trainable.values())
    # every LoRA tensor moved from where it started (B from 0): the final file against the step-20 one,
    # except two that cannot: at 64 px the mid block sees 1x1 latents, its self-attention has a single
    # token, softmax over one key is constant, and to_q / to_k get a zero gradient
    final, half = lora_weights(trained_run.out), lora_weights(os.path.join(trained_run.out, f"checkpoint-{STEPS // 2}"))
    single_token = {k for k in final if re.match(r"unet\.mid_block\..*\.attn1\.to_[qk]\.", k)}
    assert all(final[k].abs().max() > 0 for k in final if ".up." in k and k not in single_token)
    unchanged = {k for k in final if torch.equal(final[k], half[k])}
    assert unchanged <= single_token and len(single_token) == 4, unchanged


def test_training_lowers_the_loss_on_a_fixed_batch(trained_run, load_tiny):
    """compute_loss on all 8 images with fixed seeds: the base model, then base + the trained LoRA."""
    cfg = trained_run.cfg
    sd = load_tiny(cfg)
    images, captions = lce.load_captioned_images(cfg, show_progress=False)
    ds = lce.CaptionedImages(images, lce.tokenize(sd.tokenizers, captions), cfg)
    batch = collate_items(ds, [(i, False, 1000 + i) for i in range(len(ds))])
    with torch.no_grad():
        before = lce.compute_loss(batch, sd).mean().item()
        pipe = fresh_pipe(cfg.MODEL_ID, trained_run.out)
        sd.unet, sd.text_encoders = pipe.unet, (pipe.text_encoder,)
        after = lce.compute_loss(batch, sd).mean().item()
    assert after < 0.9 * before, (before, after)


def test_the_gradients_are_clipped_at_every_optimizer_step(trained_run):
    """metrics.jsonl logs each step's gradient norm before clipping: above MAX_GRAD_NORM at every step,
    so clip_grad_norm_ scaled the gradients down at every step (a spent iterator would give a norm of 0)."""
    lines = metrics(trained_run.out)
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > MAX_GRAD_NORM for r in lines), lines[:3]


# ----------------------------------------------------------------------------- the saved files
@pytest.fixture(scope="module")
def reloaded(trained_run, tiny_model_dir):
    with capture_library_messages() as messages:
        pipe = fresh_pipe(tiny_model_dir, trained_run.out)
    return pipe, messages


def test_a_checkpoints_file_holds_exactly_its_trained_tensors_and_reloads_as_that_model(trained_run, tiny_model_dir):
    """checkpoint-20/: its LoRA file (diffusers' format, read by load_lora_weights) gives exactly the
    model made of its own trained tensors, for the UNet and the text encoder, at the trained strength."""
    folder = os.path.join(trained_run.out, f"checkpoint-{STEPS // 2}")
    model = trained_model(trained_run, folder, load_checkpoint(folder)["trainable"])
    with capture_library_messages() as messages:
        pipe = fresh_pipe(tiny_model_dir, folder)
    assert key_complaints(messages) == [], messages
    y_trained, h_trained = pipe_outputs(model)
    y, h = pipe_outputs(pipe)
    assert_close(y, y_trained, what="UNet")
    assert_close(h, h_trained, what="text encoder")
    y0, h0 = pipe_outputs(fresh_pipe(tiny_model_dir))
    assert maxdiff(y_trained, y0) > 1000 * tol(y_trained) and maxdiff(h_trained, h0) > 1000 * tol(h_trained)


def test_saved_file_has_rank_alpha_and_targets_of_both_models(trained_run):
    tensors, meta = read_safetensors(os.path.join(trained_run.out, lce.WEIGHTS_NAME))
    assert all(v.dtype == torch.float32 for v in tensors.values())
    te_keys = [k for k in tensors if k.startswith("text_encoder.")]
    assert len(te_keys) == 2 * 2 * len(lce.TEXT_ENCODER_TARGET_MODULES)  # an A and a B per CLIP projection, 2 layers
    adapter = json.loads(meta["lora_adapter_metadata"])
    for part, targets in (("unet", lce.TARGET_MODULES), ("text_encoder", lce.TEXT_ENCODER_TARGET_MODULES)):
        assert adapter[f"{part}.r"] == RANK and adapter[f"{part}.lora_alpha"] == ALPHA
        assert sorted(adapter[f"{part}.target_modules"]) == sorted(targets)
        assert adapter[f"{part}.use_dora"] is False and adapter[f"{part}.use_rslora"] is False


def test_both_final_files_load_to_one_model_at_the_trained_strength(trained_run, reloaded, tiny_model_dir):
    pipe, messages = reloaded
    assert key_complaints(messages) == [], messages
    assert {m.scaling[a] for m in pipe.unet.modules() if hasattr(m, "scaling") for a in m.scaling} == {ALPHA / RANK}
    y, h = pipe_outputs(pipe)
    webui = pipe_outputs(fresh_pipe(tiny_model_dir, trained_run.out, weight_name=WEBUI_NAME))  # kohya keys
    assert_close(webui[0], y, what="UNet, WebUI file")
    assert_close(webui[1], h, what="text encoder, WebUI file")
    assert "reload check:" in trained_run.log  # and the run's own check of the UNet, against its trained model


def test_alpha_metadata_matters_same_weights_at_scale_one_differ(trained_run, reloaded, tmp_path, tiny_model_dir):
    """Without the alpha metadata diffusers would assume alpha = r (scale 1, not 2): the output
    would differ. So the metadata in our file is what makes the reload exact."""
    save_file(load_file(os.path.join(trained_run.out, lce.WEIGHTS_NAME)), str(tmp_path / lce.WEIGHTS_NAME), metadata={"format": "pt"})
    pipe = fresh_pipe(tiny_model_dir, str(tmp_path))
    assert {m.scaling[a] for m in pipe.unet.modules() if hasattr(m, "scaling") for a in m.scaling} == {1.0}
    assert maxdiff(pipe_outputs(pipe)[0], pipe_outputs(reloaded[0])[0]) > 1e-3


def test_a_file_missing_a_tensor_is_reported_by_diffusers(trained_run, tmp_path, tiny_model_dir):
    """Control for the 'no key complaints' assertions above: diffusers logs a file missing one tensor,
    naming it, and capture_library_messages sees that line."""
    tensors, meta = read_safetensors(os.path.join(trained_run.out, lce.WEIGHTS_NAME))
    gone = sorted(k for k in tensors if k.startswith("unet.") and ".up." in k)[0]
    del tensors[gone]
    save_file(tensors, str(tmp_path / lce.WEIGHTS_NAME), metadata=meta)
    with capture_library_messages() as messages:
        fresh_pipe(tiny_model_dir, str(tmp_path))
    layer = gone[len("unet."):].split(".lora")[0]
    assert [m for m in key_complaints(messages) if "missing keys" in m and layer in m], messages


# ----------------------------------------------------------------------------- accumulation = a larger batch
@pytest.fixture(scope="module")
def batch_splits(tmp_path_factory, tiny_args):
    """The same 6 images, 2 epochs, three ways: batches of 4 (4 + 2 images a step), micro-batches of 2
    accumulated 2 at a time (2 + 2, then 2 alone), and of 1 accumulated 4 at a time (then 2 alone)."""
    runs = {}
    for batch, accumulation in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path_factory.mktemp(f"b{batch}x{accumulation}") / "out"
        runs[(batch, accumulation)] = run_main(tiny_args(f"--OUTPUT_DIR={out}", "--MAX_TRAIN_SAMPLES=6", "--NUM_EPOCHS=2",
                                                         f"--BATCH_SIZE={batch}", f"--GRADIENT_ACCUMULATION_STEPS={accumulation}",
                                                         "--LOG_EVERY=1", "--CHECKPOINTING_STEPS=None"))
    return runs


def test_gradient_accumulation_gives_the_update_of_the_larger_batch(batch_splits):
    """Each example draws its noise from its own seed and each step averages over its examples (an
    epoch's last, smaller step included), so accumulating micro-batches is one larger batch: the same
    losses and the same weights, to float rounding."""
    (ref_key, ref), *others = batch_splits.items()
    assert "2 steps/epoch, 4 steps, 2 epochs" in ref.log
    ref_w, ref_m = lora_weights(ref.out), metrics(ref.out)
    for key, run in others:
        assert "2 steps/epoch, 4 steps, 2 epochs" in run.log, key
        w, m = lora_weights(run.out), metrics(run.out)
        # float rounding of another summation order, amplified by Adam's g/√v where a gradient is near 0:
        # measured up to 1.2e-5 on an AMD EPYC, below 1e-5 elsewhere; a real mismatch moves weights by ~lr = 1e-4
        assert max(maxdiff(w[k], ref_w[k]) for k in w) <= 5e-5, key
        assert [r["loss"] for r in m] == pytest.approx([r["loss"] for r in ref_m], rel=1e-5), key
    assert max(maxdiff(v, 0) for v in ref_w.values()) > 1e-3  # they trained


# ----------------------------------------------------------------------------- caption dropout
def dropped_in_epoch(epoch, p, n=8, seed=42):
    sampler = lce.EpochShuffle(n, seed, random_flip=True)
    sampler.set_epoch(epoch)
    return {i: lce.caption_dropped(example_seed, p) for i, _, example_seed in sampler}


def test_caption_dropout_drops_p_of_the_examples_afresh_each_epoch_and_the_same_on_a_resume():
    draws = [d for epoch in range(500) for d in dropped_in_epoch(epoch, 0.1).values()]
    assert 0.085 < sum(draws) / len(draws) < 0.115  # 4,000 draws of p = 0.1: three standard deviations
    assert dropped_in_epoch(7, 0.1) == dropped_in_epoch(7, 0.1)  # a pure function of (SEED, epoch): resume
    assert len({tuple(dropped_in_epoch(e, 0.5).values()) for e in range(10)}) > 5  # fresh each epoch
    assert not any(dropped_in_epoch(3, 0.0).values())


def test_a_dropped_caption_trains_with_the_empty_captions_encoding_made_once(make_cfg, load_tiny):
    cfg = make_cfg("--CAPTION_DROPOUT=0.5")
    sd = load_tiny(cfg)
    images, captions = lce.load_captioned_images(cfg, show_progress=False)
    empty_ids = lce.tokenize(sd.tokenizers, [""])[0]
    ds = lce.CaptionedImages(images, lce.tokenize(sd.tokenizers, captions), cfg, empty_ids)
    cached = lce.cache_latents(ds, sd, cfg, show_progress=False)
    with torch.no_grad():
        every = lce.encode_prompt(sd.family, sd.text_encoders, lce.tokenize(sd.tokenizers, list(captions) + [""]))
    torch.testing.assert_close(cached.text["encoder_hidden_states"], every["encoder_hidden_states"])  # none dropped at caching
    seeds = range(200, 240)
    dropped = next(s for s in seeds if lce.caption_dropped(s, 0.5))
    kept = next(s for s in seeds if not lce.caption_dropped(s, 0.5))
    assert torch.equal(cached[(3, False, dropped)]["encoder_hidden_states"], every["encoder_hidden_states"][-1])
    assert torch.equal(cached[(3, False, kept)]["encoder_hidden_states"], every["encoder_hidden_states"][3])
    assert torch.equal(ds[(3, False, dropped)]["input_ids"], empty_ids) and ds[(3, False, dropped)]["caption_dropped"]
    assert torch.equal(ds[(3, False, kept)]["input_ids"], ds.input_ids[3])


# ----------------------------------------------------------------------------- tag shuffling
def test_tag_shuffling_keeps_the_first_tags_in_place_and_every_tag(make_cfg, load_tiny, tiny_args, tmp_path):
    caption = "zwx, 1girl, red hair, smile, outdoors, blue sky"
    drawn = {lce.shuffle_tags(caption, seed, 2) for seed in range(30)}
    assert len(drawn) > 10 and lce.shuffle_tags(caption, 7, 2) == lce.shuffle_tags(caption, 7, 2)  # per seed
    for text in drawn:
        tags = text.split(", ")
        assert tags[:2] == ["zwx", "1girl"] and sorted(tags) == sorted(caption.split(", "))
    # with the latent cache: latents cached, the prompt tokenized per draw and encoded in the step
    cfg = make_cfg("--SHUFFLE_CAPTION_TAGS=True", "--KEEP_TAGS=1", "--CAPTION_DROPOUT=0.5")
    sd = load_tiny(cfg)
    images, _ = lce.load_captioned_images(cfg, show_progress=False)
    captions = [caption] * len(images)
    empty_ids = lce.tokenize(sd.tokenizers, [""])[0]
    cached = lce.cache_latents(lce.CaptionedImages(images, lce.tokenize(sd.tokenizers, captions), cfg, empty_ids),
                               sd, cfg, show_progress=False)
    data = lce.ShuffledTags(cached, captions, sd.tokenizers, keep=1)
    kept = next(s for s in range(50) if not lce.caption_dropped(s, 0.5))
    dropped = next(s for s in range(50) if lce.caption_dropped(s, 0.5))
    item = data[(2, False, kept)]
    assert "encoder_hidden_states" not in item and "latent_mean" in item
    assert torch.equal(item["input_ids"], lce.tokenize(sd.tokenizers, [lce.shuffle_tags(caption, kept, 1)])[0])
    assert torch.equal(data[(2, False, dropped)]["input_ids"], empty_ids)
    with torch.no_grad():
        assert lce.compute_loss(collate_items(data, [(0, False, kept), (1, True, dropped)]), sd).shape == (2,)
    run = run_main(tiny_args("--SHUFFLE_CAPTION_TAGS=True", "--MAX_TRAIN_STEPS=2", f"--OUTPUT_DIR={tmp_path / 'out'}"))
    assert "trained 2 steps" in run.log  # main keeps the text encoders for it


# ----------------------------------------------------------------------------- frozen = untouched, in the loop
def test_every_frozen_tensor_is_bit_identical_after_the_training_loop(make_cfg, load_tiny, tiny_model_dir):
    """Three optimizer steps of the real loop (lce.train on a run built by the functions main uses), the
    text encoder trained too: every frozen tensor is then still the one on disk, bit for bit."""
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    cfg = make_cfg("--TRAIN_TEXT_ENCODER=True", "--MAX_TRAIN_STEPS=3", "--LEARNING_RATE=1e-2", "--CACHE_LATENTS=False",
                   "--CHECKPOINTING_STEPS=None", "--LOG_EVERY=100")
    sd = load_tiny(cfg)
    lce.add_lora(sd.unet, cfg, cfg.TARGET_MODULES)
    lce.add_lora(sd.text_encoders[0], cfg, cfg.TEXT_ENCODER_TARGET_MODULES, "TEXT_ENCODER_TARGET_MODULES")
    images, captions = lce.load_captioned_images(cfg, show_progress=False)
    dataset = lce.CaptionedImages(images, lce.tokenize(sd.tokenizers, captions), cfg)
    groups = lce.lora_param_groups([(sd.unet, cfg.LEARNING_RATE), (sd.text_encoders[0], cfg.LEARNING_RATE)], cfg)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    run = lce.prepare_run(cfg, Accelerator(cpu=True), sd, dataset, groups)
    assert lce.train(run) == 3
    for model, cls, folder in ((sd.unet, UNet2DConditionModel, "unet"), (sd.text_encoders[0], CLIPTextModel, "text_encoder"),
                               (sd.vae, AutoencoderKL, "vae")):
        fresh = dict(cls.from_pretrained(tiny_model_dir, subfolder=folder).named_parameters())
        # PEFT moves a wrapped Linear's weights under `.base_layer`
        frozen = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters() if ".lora_" not in n}
        assert frozen.keys() == fresh.keys(), folder
        for n, p in frozen.items():
            assert not p.requires_grad and p.grad is None, n
            assert p.dtype == fresh[n].dtype and torch.equal(p.detach(), fresh[n].detach()), f"{folder}.{n} changed"
    assert any(p.abs().max() > 0 for n, p in sd.unet.named_parameters() if "lora_B" in n)  # and the LoRA did train


# ----------------------------------------------------------------------------- the loss
@pytest.fixture
def schedulers(tiny_model_dir):
    from diffusers import DDPMScheduler

    eps = DDPMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler")
    assert eps.config.prediction_type == "epsilon"
    return eps, DDPMScheduler.from_config(eps.config, prediction_type="v_prediction")


def test_min_snr_weights_match_the_formula(schedulers):
    eps, v = schedulers
    gamma, t = 5.0, torch.tensor([0, 5, 20, 50, 100, 200, 400, 700, 999])
    ac = eps.alphas_cumprod.double()[t]
    snr = ac / (1 - ac)
    assert (snr > gamma).any() and (snr < gamma).any()
    clipped = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))
    w_eps, w_v = lce.min_snr_weights(eps, t, gamma), lce.min_snr_weights(v, t, gamma)
    assert w_eps.shape == w_v.shape == t.shape
    assert torch.allclose(w_eps.double(), clipped / snr, rtol=1e-5, atol=0)
    assert torch.allclose(w_v.double(), clipped / (snr + 1), rtol=1e-5, atol=0)
    assert torch.allclose(w_eps[snr < gamma].double(), torch.ones(int((snr < gamma).sum()), dtype=torch.float64))


def by_hand(seeds, shape, num_timesteps=1000):
    """Each example's draws as compute_loss makes them, written out: its own generator, in the order
    sample of z0, ε, t."""
    draws = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        draws.append((torch.randn(shape, generator=g), torch.randn(shape, generator=g),
                      torch.randint(0, num_timesteps, (), generator=g)))
    return [torch.stack(d) for d in zip(*draws)]


def hand_batch(B, seed=11, width=32):
    g = torch.Generator().manual_seed(seed)
    return {"latent_mean": torch.randn(B, 4, 8, 8, generator=g), "latent_std": 0.1 * torch.rand(B, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(B, 77, width, generator=g), "seed": [100 + i for i in range(B)]}


def test_compute_loss_with_snr_gamma_is_the_weighted_per_example_mse(make_cfg, load_tiny, schedulers):
    sd = load_tiny(make_cfg())
    sd.noise_scheduler = schedulers[0]
    B, gamma = 6, 2.0
    batch = hand_batch(B)
    with torch.no_grad():
        loss = lce.compute_loss(batch, sd, snr_gamma=gamma)
        plain = lce.compute_loss(batch, sd)
        sample, noise, t = by_hand(batch["seed"], (4, 8, 8))
        latents = (batch["latent_mean"] + batch["latent_std"] * sample) * 0.18215
        ac = sd.noise_scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        pred = sd.unet((ac.sqrt() * latents.double() + (1 - ac).sqrt() * noise.double()).float(), t,
                       batch["encoder_hidden_states"], return_dict=False)[0]
    per_example = ((pred.double() - noise.double()) ** 2).mean(dim=(1, 2, 3))
    snr = ac.view(-1) / (1 - ac.view(-1))
    weights = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / snr
    assert (weights < 0.999).any() and (weights == 1).any(), (t, snr)  # both regimes in this batch
    assert loss.shape == plain.shape == (B,)
    torch.testing.assert_close(loss.double(), per_example * weights, rtol=1e-4, atol=0)
    torch.testing.assert_close(plain.double(), per_example, rtol=1e-4, atol=0)


@pytest.mark.parametrize("offset", [0.5, 0.0])
def test_noise_offset_adds_one_shift_per_example_and_channel(offset):
    B, C, S = 256, 4, 16
    seeds = list(range(B))
    sample, noise, t = lce.draw_noise(seeds, (C, S, S), 1000, offset, torch.device("cpu"))
    expected = []
    for seed in seeds:  # exactly randn + offset·randn(C, 1, 1) from the example's generator, after z0's randn
        g = torch.Generator().manual_seed(seed)
        torch.randn(C, S, S, generator=g)
        eps = torch.randn(C, S, S, generator=g)
        expected.append(eps + offset * torch.randn(C, 1, 1, generator=g) if offset else eps)
    assert torch.equal(noise, torch.stack(expected))
    # the per-(example, channel) mean of the noise has std ≈ offset (plus 1/S = 0.0625 from the randn)
    std = noise.mean(dim=(2, 3)).std().item()
    assert (abs(std - offset) <= 0.2 * offset) if offset else std < 0.1, std


def test_gradient_checkpointing_is_used_and_gives_the_same_gradients(make_cfg, load_tiny, monkeypatch):
    import torch.utils.checkpoint as tuc

    calls, real = [], tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))  # read when enabled
    results = []
    for checkpointing in (False, True):
        cfg = make_cfg()
        unet = load_tiny(cfg).unet
        torch.manual_seed(0)
        params = lce.add_lora(unet, cfg, cfg.TARGET_MODULES)
        with torch.no_grad():  # B != 0, so that A gets gradients too
            for n, p in unet.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        g = torch.Generator().manual_seed(1)
        loss = unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g)).sample.square().mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in params], len(calls)))
    (loss0, grads0, calls0), (loss1, grads1, calls1) = results
    assert calls0 == 0 and calls1 > 0  # blocks ran through torch.utils.checkpoint: activations recomputed
    assert torch.equal(loss0, loss1) and math.isfinite(loss0.item())
    for a, b in zip(grads0, grads1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_v_prediction_target_is_the_velocity(make_cfg, load_tiny, schedulers):
    """A v-prediction model (SD 2.x's 768-px models) learns v = √ᾱ_t·ε − √(1-ᾱ_t)·z0 (Salimans & Ho 2022),
    computed here by hand from the same random draws."""
    sd = load_tiny(make_cfg())
    sd.noise_scheduler = schedulers[1]
    batch = hand_batch(4, seed=3)
    with torch.no_grad():
        loss = lce.compute_loss(batch, sd)
        sample, eps, t = by_hand(batch["seed"], (4, 8, 8))
        z0 = ((batch["latent_mean"] + batch["latent_std"] * sample) * 0.18215).double()
        ac = sd.noise_scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        pred = sd.unet((ac.sqrt() * z0 + (1 - ac).sqrt() * eps.double()).float(), t, batch["encoder_hidden_states"],
                       return_dict=False)[0].double()
    v = ac.sqrt() * eps.double() - (1 - ac).sqrt() * z0
    torch.testing.assert_close(loss.double(), ((pred - v) ** 2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=0)
    assert (loss.double() - ((pred - eps.double()) ** 2).mean(dim=(1, 2, 3))).abs().min() > 1e-4  # not the ε target


@pytest.fixture(scope="module")
def first_step_losses(tiny_args, tmp_path_factory):
    """The logged loss of the first optimizer step (the same draws: same seed, LoRA B = 0) of a plain
    run, one with --SNR_GAMMA=1.0 and one with --NOISE_OFFSET=0.1, as a user gives them."""
    from conftest import run_main

    losses = {}
    for name, extra in (("plain", []), ("snr", ["--SNR_GAMMA=1.0"]), ("offset", ["--NOISE_OFFSET=0.1"])):
        out = tmp_path_factory.mktemp(name) / "out"
        run_main(tiny_args("--MAX_TRAIN_STEPS=1", "--BATCH_SIZE=8", "--LOG_EVERY=1", f"--OUTPUT_DIR={out}", *extra))
        with open(out / "metrics.jsonl") as f:
            losses[name] = json.loads(f.readline())["loss"]
    return losses


def test_snr_gamma_and_noise_offset_on_the_command_line_reach_the_loss(first_step_losses):
    plain, snr, offset = first_step_losses["plain"], first_step_losses["snr"], first_step_losses["offset"]
    # Min-SNR weights min(SNR, γ)/SNR <= 1, below 1 where SNR(t) > γ: the same draws give a smaller loss
    assert 0 < snr < 0.99 * plain, first_step_losses
    assert abs(offset - plain) > 1e-5 * plain, first_step_losses  # other noise, other loss (float noise: ~1e-7)
