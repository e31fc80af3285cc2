"""Training (section 6): one run of the script's sections called in main's order on the tiny model,
keeping the models it trains — the frozen weights stay bit-identical, every LoRA tensor trains, the
loss falls, clipping acts at every optimizer step, and the saved files reload into a fresh diffusers
pipeline as exactly the trained UNet and text encoder (α != r). Then the loss itself: Min-SNR-γ,
offset noise, gradient checkpointing."""
import json
import math
import os
import re
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_complete_example as lce
from conftest import (WEBUI_NAME, assert_close, capture_library_messages, collate, fresh_pipe, key_complaints,
                      lora_layer_names, maxdiff, outputs, pipe_outputs, read_safetensors, tol, total_grad_norm)

RANK, ALPHA, STEPS, MAX_GRAD_NORM = 4, 8, 40, 0.01


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_args):
    """main's sections 1-7, called one by one: r=4, α=8, the text encoder trained too, gradient
    accumulation, a high learning rate and a MAX_GRAD_NORM small enough that clipping acts at every step."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    out = str(tmp_path_factory.mktemp("trained") / "out")
    cfg = lce.resolve_config(tiny_args(f"--OUTPUT_DIR={out}", f"--LORA_RANK={RANK}", f"--LORA_ALPHA={ALPHA}",
                                       f"--MAX_GRAD_NORM={MAX_GRAD_NORM}", "--LEARNING_RATE=1e-2", f"--MAX_TRAIN_STEPS={STEPS}",
                                       "--BATCH_SIZE=2", "--GRADIENT_ACCUMULATION_STEPS=2", "--TRAIN_TEXT_ENCODER=True"))
    accelerator, dtype = lce.start(cfg)
    set_seed(cfg.SEED)
    images, captions = lce.load_captioned_images(cfg, show_progress=False)
    tok, te, vae, unet, sched = lce.load_models(cfg, dtype, dtype)
    lce.freeze(te, vae, unet)
    params = lce.add_lora(unet, cfg, cfg.TARGET_MODULES) + lce.add_lora(te, cfg, cfg.TEXT_ENCODER_TARGET_MODULES,
                                                                         "TEXT_ENCODER_TARGET_MODULES")
    initial = {f"{part}.{n}": p.detach().clone() for part, m in (("unet", unet), ("te", te))
               for n, p in m.named_parameters() if p.requires_grad}
    dataset = lce.CaptionedImages(images, lce.tokenize(tok, captions), cfg)
    fixed_batch = collate(dataset[(i, False)] for i in range(len(dataset)))  # all 8 images, unflipped

    def fixed_batch_loss():
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(1234)
            return lce.compute_loss(fixed_batch, unet, sched, vae.config.scaling_factor, vae, te).item()

    loss_before = fixed_batch_loss()
    dataloader = lce.make_dataloader(lce.cache_latents(dataset, vae, te, cfg, show_progress=False), cfg, cuda=False)
    optimizer = lce.make_optimizer([(unet, cfg.LEARNING_RATE), (te, cfg.LEARNING_RATE)], cfg, cuda=False)
    train_unet, train_te, optimizer, dataloader = accelerator.prepare(unet, te, optimizer, dataloader)
    lr_scheduler = get_scheduler(cfg.LR_SCHEDULER, optimizer=optimizer, num_training_steps=STEPS)
    clip_calls, clip = [], accelerator.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        pre = total_grad_norm(parameters)
        returned = clip(parameters, max_norm, *args, **kwargs)
        clip_calls.append(dict(params=parameters, max_norm=max_norm, pre=pre, post=total_grad_norm(parameters),
                               returned=float(returned), sync=accelerator.sync_gradients))
        return returned

    accelerator.clip_grad_norm_ = recording_clip
    set_seed(cfg.SEED, device_specific=True)
    steps = lce.train(cfg, accelerator, unet, te, [train_unet, train_te], optimizer, lr_scheduler, dataloader, sched,
                      vae.config.scaling_factor, STEPS)
    lce.save_and_check(cfg, accelerator, unet, te, 8, steps, len(dataset), time.time())
    unet.eval()
    te.eval()
    return SimpleNamespace(cfg=cfg, out=out, unet=unet, te=te, vae=vae, params=params, initial=initial, steps=steps,
                           loss_before=loss_before, loss_after=fixed_batch_loss(), clip_calls=clip_calls)


# ----------------------------------------------------------------------------- frozen = untouched
def test_run_trained_exactly_the_lora_tensors(trained_run):
    assert trained_run.steps == STEPS
    for model in (trained_run.unet, trained_run.te):
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_" in n for n in trainable)
    assert sorted(map(id, trained_run.params)) == sorted(id(p) for m in (trained_run.unet, trained_run.te)
                                                         for p in m.parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in trained_run.vae.parameters())


def test_every_frozen_tensor_is_bit_identical_to_the_checkpoint_on_disk(trained_run, tiny_model_dir):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    for model, cls, folder in ((trained_run.unet, UNet2DConditionModel, "unet"), (trained_run.te, CLIPTextModel, "text_encoder"),
                               (trained_run.vae, AutoencoderKL, "vae")):
        fresh = dict(cls.from_pretrained(tiny_model_dir, subfolder=folder).named_parameters())
        # PEFT moves a wrapped Linear's weights under `.base_layer`
        frozen = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters() if ".lora_" not in n}
        assert frozen.keys() == fresh.keys(), folder
        for n, p in frozen.items():
            assert not p.requires_grad and p.grad is None, n
            assert p.dtype == fresh[n].dtype and torch.equal(p.detach(), fresh[n].detach()), f"{folder}.{n} changed"


def test_every_lora_tensor_trained_and_b_started_at_zero(trained_run):
    now = {f"{part}.{n}": p for part, m in (("unet", trained_run.unet), ("te", trained_run.te))
           for n, p in m.named_parameters() if p.requires_grad}
    assert now.keys() == trained_run.initial.keys()
    assert all(p.dtype == torch.float32 for p in now.values())
    b_names = [n for n in now if ".lora_B." in n]
    assert 2 * len(b_names) == len(now) and any(n.startswith("te.") for n in b_names)
    assert all(torch.count_nonzero(trained_run.initial[n]) == 0 for n in b_names)
    unchanged = {n for n, p in now.items() if torch.equal(p.detach(), trained_run.initial[n])}
    # Every LoRA tensor trained, except at most two that cannot: at 64 px the mid block sees 1x1 latents,
    # its self-attention has a single token, softmax over one key is constant, and to_q / to_k get a zero
    # gradient (or, from the kernel's rounding, one of ~1e-9 that AdamW still turns into a step).
    single_token = {n for n in b_names if re.match(r"unet\.mid_block\..*\.attn1\.to_[qk]\.", n)}
    assert len(single_token) == 2 and unchanged <= single_token, unchanged


def test_training_lowers_the_loss_on_a_fixed_batch(trained_run):
    assert trained_run.loss_after < 0.9 * trained_run.loss_before, (trained_run.loss_before, trained_run.loss_after)


def test_the_lora_gradients_are_clipped_once_per_optimizer_step(trained_run):
    calls = trained_run.clip_calls
    assert len(calls) == STEPS  # not once per micro-batch (accumulation = 2)
    for c in calls:
        assert c["sync"], "clipped on a micro-batch that does not step the optimizer"
        assert isinstance(c["params"], list) and sorted(map(id, c["params"])) == sorted(map(id, trained_run.params))
        assert c["max_norm"] == MAX_GRAD_NORM and c["post"] <= MAX_GRAD_NORM * (1 + 1e-4)
        assert c["returned"] == pytest.approx(c["pre"], rel=1e-4)
        assert c["pre"] > MAX_GRAD_NORM  # above the limit before: clipping really happened, at every step


# ----------------------------------------------------------------------------- the saved files
@pytest.fixture(scope="module")
def reloaded(trained_run, tiny_model_dir):
    with capture_library_messages() as messages:
        pipe = fresh_pipe(tiny_model_dir, trained_run.out)
    return pipe, messages


def test_saved_file_holds_exactly_the_trained_tensors_with_rank_and_alpha(trained_run):
    tensors, meta = read_safetensors(os.path.join(trained_run.out, lce.WEIGHTS_NAME))
    expected = lce.lora_state_dict(trained_run.unet, trained_run.te)
    assert tensors.keys() == expected.keys()
    assert all(tensors[k].dtype == torch.float32 and torch.equal(tensors[k], v) for k, v in expected.items())
    # one A and one B per adapted CLIP projection: 2 layers x 4 targets
    te_keys = [k for k in tensors if k.startswith("text_encoder.")]
    assert len(te_keys) == 2 * len(lora_layer_names(trained_run.te)) == 2 * 2 * len(lce.TEXT_ENCODER_TARGET_MODULES)
    adapter = json.loads(meta["lora_adapter_metadata"])
    for part, targets in (("unet", lce.TARGET_MODULES), ("text_encoder", lce.TEXT_ENCODER_TARGET_MODULES)):
        assert adapter[f"{part}.r"] == RANK and adapter[f"{part}.lora_alpha"] == ALPHA
        assert sorted(adapter[f"{part}.target_modules"]) == sorted(targets)
        assert adapter[f"{part}.use_dora"] is False and adapter[f"{part}.use_rslora"] is False
    assert json.loads(meta["training_config"]) == trained_run.cfg.as_dict()
    with open(os.path.join(trained_run.out, "training_config.json")) as f:
        assert json.load(f) == trained_run.cfg.as_dict()


def test_both_files_reproduce_the_trained_models_in_a_fresh_pipeline(trained_run, reloaded, tiny_model_dir):
    pipe, messages = reloaded
    assert key_complaints(messages) == [], messages
    y_trained, h_trained = outputs(trained_run.unet, trained_run.te)
    y, h = pipe_outputs(pipe)
    assert_close(y, y_trained, what="UNet, diffusers file")
    assert_close(h, h_trained, what="text encoder, diffusers file")
    # at the trained strength α/r = 2, and the adapters matter: the comparison is not base vs base
    assert {m.scaling[a] for m in pipe.unet.modules() if hasattr(m, "scaling") for a in m.scaling} == {ALPHA / RANK}
    y0, h0 = pipe_outputs(fresh_pipe(tiny_model_dir))
    assert maxdiff(y_trained, y0) > 1000 * tol(y_trained) and maxdiff(h_trained, h0) > 1000 * tol(h_trained)
    # the WebUI/ComfyUI file (kohya keys) loads to the same two models
    y, h = pipe_outputs(fresh_pipe(tiny_model_dir, trained_run.out, weight_name=WEBUI_NAME))
    assert_close(y, y_trained, what="UNet, WebUI file")
    assert_close(h, h_trained, what="text encoder, WebUI file")


def test_alpha_metadata_matters_same_weights_at_scale_one_differ(trained_run, tmp_path, tiny_model_dir):
    """Without the alpha metadata diffusers would assume alpha = r (scale 1, not 2): the output
    would differ. So the metadata in our file is what makes the reload exact."""
    save_file(load_file(os.path.join(trained_run.out, lce.WEIGHTS_NAME)), str(tmp_path / lce.WEIGHTS_NAME), metadata={"format": "pt"})
    pipe = fresh_pipe(tiny_model_dir, str(tmp_path))
    assert {m.scaling[a] for m in pipe.unet.modules() if hasattr(m, "scaling") for a in m.scaling} == {1.0}
    assert maxdiff(pipe_outputs(pipe)[0], outputs(trained_run.unet)[0]) > 1e-3


def test_key_complaint_capture_works(trained_run, tmp_path, tiny_model_dir):
    """Negative control for the 'no key complaints' assertions: a file missing one tensor is
    reported by diffusers, and capture_library_messages sees it."""
    tensors, meta = read_safetensors(os.path.join(trained_run.out, lce.WEIGHTS_NAME))
    del tensors[sorted(k for k in tensors if k.startswith("unet.") and ".up." in k)[0]]
    save_file(tensors, str(tmp_path / lce.WEIGHTS_NAME), metadata=meta)
    with capture_library_messages() as messages:
        try:
            fresh_pipe(tiny_model_dir, str(tmp_path))
        except Exception as e:  # refusing the file outright is also a complaint
            messages.append(f"missing key error: {e}")
    assert key_complaints(messages), messages


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


def test_compute_loss_with_snr_gamma_is_the_weighted_per_image_mse(make_cfg, load_tiny, schedulers):
    eps, _ = schedulers
    unet = load_tiny(make_cfg())[3]
    g = torch.Generator().manual_seed(11)
    B = 6
    batch = {"latent_mean": torch.randn(B, 4, 8, 8, generator=g), "latent_std": 0.1 * torch.rand(B, 4, 8, 8, generator=g),
             "text_emb": torch.randn(B, 77, 32, generator=g)}
    sf, gamma, seed = 0.18215, 2.0, 5
    with torch.no_grad():
        torch.manual_seed(seed)
        loss = lce.compute_loss(batch, unet, eps, sf, snr_gamma=gamma).item()
        torch.manual_seed(seed)
        plain = lce.compute_loss(batch, unet, eps, sf).item()
        torch.manual_seed(seed)  # by hand, the same random draws in the same order: z0, ε, t
        latents = (batch["latent_mean"] + batch["latent_std"] * torch.randn(B, 4, 8, 8)) * sf
        noise = torch.randn(B, 4, 8, 8)
        t = torch.randint(0, 1000, (B,))
        ac = eps.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        pred = unet((ac.sqrt() * latents.double() + (1 - ac).sqrt() * noise.double()).float(), t, batch["text_emb"],
                    return_dict=False)[0]
    per_image = ((pred.double() - noise.double()) ** 2).mean(dim=(1, 2, 3))
    snr = ac.view(-1) / (1 - ac.view(-1))
    weights = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / snr
    assert (weights < 0.999).any() and (weights == 1).any(), (t, snr)  # both regimes in this batch
    assert loss == pytest.approx((per_image * weights).mean().item(), rel=1e-4)
    assert plain == pytest.approx(per_image.mean().item(), rel=1e-4)
    assert abs(loss - plain) > 1e-3 * plain  # the weighting did something


class AddNoiseSpy:
    """The scheduler, with add_noise recording the noise compute_loss draws."""

    def __init__(self, scheduler):
        self.scheduler, self.config, self.noises = scheduler, scheduler.config, []

    def add_noise(self, latents, noise, t):
        self.noises.append(noise.detach().clone())
        return self.scheduler.add_noise(latents, noise, t)


@pytest.mark.parametrize("offset", [0.5, 0.0])
def test_noise_offset_adds_one_shift_per_image_and_channel(schedulers, offset):
    B, C, S = 256, 4, 16
    batch = {"latent_mean": torch.zeros(B, C, S, S), "latent_std": torch.ones(B, C, S, S), "text_emb": torch.zeros(B, 77, 8)}
    spy = AddNoiseSpy(schedulers[0])
    torch.manual_seed(123)
    loss = lce.compute_loss(batch, lambda noisy, *a, **k: (torch.zeros_like(noisy),), spy, 0.18215, noise_offset=offset)
    (noise,) = spy.noises
    torch.manual_seed(123)  # exactly randn + offset·randn(B, C, 1, 1), drawn after z0's randn
    torch.randn(B, C, S, S)
    expected = torch.randn(B, C, S, S) + (offset * torch.randn(B, C, 1, 1) if offset else 0)
    assert torch.equal(noise, expected)
    assert loss.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)  # the target is that noise
    # the per-(image, channel) mean of the noise has std ≈ offset (plus 1/S = 0.0625 from the randn)
    std = noise.mean(dim=(2, 3)).std().item()
    assert (abs(std - offset) <= 0.2 * offset) if offset else std < 0.1, std


def test_gradient_checkpointing_is_used_and_gives_the_same_gradients(make_cfg, load_tiny, monkeypatch):
    import torch.utils.checkpoint as tuc

    calls, real = [], tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))  # read when enabled
    results = []
    for checkpointing in (False, True):
        cfg = make_cfg()
        unet = load_tiny(cfg)[3]
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
    _, v_sched = schedulers
    unet = load_tiny(make_cfg())[3]
    g = torch.Generator().manual_seed(3)
    B = 4
    batch = {"latent_mean": torch.randn(B, 4, 8, 8, generator=g), "latent_std": 0.1 * torch.rand(B, 4, 8, 8, generator=g),
             "text_emb": torch.randn(B, 77, 32, generator=g)}
    sf = 0.18215
    with torch.no_grad():
        torch.manual_seed(9)
        loss = lce.compute_loss(batch, unet, v_sched, sf).item()
        torch.manual_seed(9)
        z0 = ((batch["latent_mean"] + batch["latent_std"] * torch.randn(B, 4, 8, 8)) * sf).double()
        eps = torch.randn(B, 4, 8, 8).double()
        t = torch.randint(0, 1000, (B,))
        ac = v_sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        pred = unet((ac.sqrt() * z0 + (1 - ac).sqrt() * eps).float(), t, batch["text_emb"], return_dict=False)[0].double()
    v = ac.sqrt() * eps - (1 - ac).sqrt() * z0
    assert loss == pytest.approx(((pred - v) ** 2).mean().item(), rel=1e-5)
    assert abs(loss - ((pred - eps) ** 2).mean().item()) > 1e-3 * loss  # not the ε target


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
