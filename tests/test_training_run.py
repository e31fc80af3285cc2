"""One real training run of lce.main on the tiny model (the session fixture `trained_run`):
frozen weights stay bit-identical, the loss falls, clipping acts, and the saved file reloads
into a fresh diffusers pipeline as exactly the trained model (alpha != rank)."""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora_complete_example as lce
from conftest import TRAIN_RUN, capture_library_messages, fixed_unet_inputs, key_complaints, loss_of


def is_lora(name):
    return ".lora_" in name


def base_name(name):
    """PEFT moves a wrapped Linear's weights under `.base_layer`; map back to the pretrained name."""
    return name.replace(".base_layer.", ".")


# ----------------------------------------------------------------------------- the run itself
def test_main_completes_with_alpha_not_rank(trained_run, tiny_model_dir):
    """LORA_ALPHA=8 with LORA_RANK=4 is a normal setting: main must finish (its own reload check
    included) and write the test image that plain diffusers reproduces."""
    from diffusers import StableDiffusionPipeline

    assert trained_run.main_error is None, f"main raised {trained_run.main_error!r}"
    cfg = trained_run.cfg
    with open(os.path.join(trained_run.output_dir, "training_config.json")) as f:
        assert json.load(f) == cfg.as_dict()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.load_lora_weights(trained_run.output_dir)
    expected = pipe(cfg.VALIDATION_PROMPT, height=cfg.RESOLUTION, width=cfg.RESOLUTION,
                    num_inference_steps=cfg.NUM_INFERENCE_STEPS, guidance_scale=cfg.GUIDANCE_SCALE,
                    generator=torch.Generator().manual_seed(cfg.SEED)).images[0]
    with Image.open(os.path.join(trained_run.output_dir, "test_generation.png")) as written:
        diff = np.abs(np.asarray(written.convert("RGB"), dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert diff.shape == (cfg.RESOLUTION, cfg.RESOLUTION, 3) and diff.max() <= 1


# ----------------------------------------------------------------------------- 2. frozen = untouched
def test_run_trained_exactly_the_lora_tensors(trained_run):
    assert trained_run.add_lora_calls == 1
    unet = trained_run.unet
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(is_lora(n) for n in trainable)
    assert sorted(map(id, trained_run.lora_params)) == sorted(id(p) for p in unet.parameters() if p.requires_grad)
    for model in (trained_run.vae, trained_run.text_encoder):
        assert not any(p.requires_grad for p in model.parameters())


def test_every_frozen_tensor_is_bit_identical_after_training(trained_run):
    parts = {"unet": trained_run.unet, "vae": trained_run.vae, "text_encoder": trained_run.text_encoder}
    seen = set()
    for part, model in parts.items():
        for name, p in model.named_parameters():
            if is_lora(name):
                continue
            key = f"{part}.{base_name(name)}"
            assert key in trained_run.pretrained, f"{key}: not a pretrained tensor"
            assert not p.requires_grad, f"{key} is trainable"
            assert p.grad is None, f"{key} received a gradient"
            assert p.dtype == trained_run.pretrained[key].dtype
            assert torch.equal(p.detach(), trained_run.pretrained[key]), f"{key} changed during training"
            seen.add(key)
    # every pretrained tensor is still in the model, none was dropped or renamed away
    assert seen == set(trained_run.pretrained)


def test_frozen_tensors_equal_the_checkpoint_on_disk(trained_run, tiny_model_dir):
    from diffusers import UNet2DConditionModel

    fresh = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    trained = {base_name(n): p for n, p in trained_run.unet.named_parameters() if not is_lora(n)}
    fresh_sd = dict(fresh.named_parameters())
    assert set(trained) == set(fresh_sd)
    for n, p in fresh_sd.items():
        assert torch.equal(trained[n].detach(), p.detach()), n


def test_lora_tensors_changed_and_b_started_at_zero(trained_run):
    now = {n: p for n, p in trained_run.unet.named_parameters() if p.requires_grad}
    assert set(now) == set(trained_run.lora_initial)
    b_names = [n for n in now if ".lora_B." in n]
    a_names = [n for n in now if ".lora_A." in n]
    assert len(a_names) == len(b_names) > 0
    for n in b_names:
        assert torch.count_nonzero(trained_run.lora_initial[n]) == 0, f"{n} did not start at zero"
    for n in now:
        assert now[n].dtype == torch.float32
    unchanged = {n for n, p in now.items() if torch.equal(p.detach(), trained_run.lora_initial[n])}
    # Every LoRA tensor trained, except two that cannot: at 64 px the mid block sees 1x1 latents, so
    # its self-attention has a single token, softmax over one key is constant, and to_q / to_k get
    # exactly zero gradient (their B stays 0; AdamW's decay of 0 is 0).
    single_token = {n for n in b_names if re.match(r"mid_block\..*\.attn1\.to_[qk]\.", n)}
    assert len(single_token) == 2
    assert unchanged == single_token


# ----------------------------------------------------------------------------- 5. the loss falls
def test_training_lowers_the_loss_on_a_fixed_batch(trained_run):
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(TRAIN_RUN["LOSS_SEED"])
        after = loss_of(trained_run.fixed_batch, trained_run.unet, trained_run.scheduler,
                        trained_run.vae, trained_run.text_encoder).item()
    before = trained_run.loss_before
    assert after < 0.9 * before, f"loss on the fixed batch: {before:.4f} before, {after:.4f} after training"


# ----------------------------------------------------------------------------- 7. clipping acts
def test_main_clips_the_lora_gradients_once_per_optimizer_step(trained_run):
    calls = trained_run.clip_calls
    assert len(calls) == TRAIN_RUN["MAX_TRAIN_STEPS"]  # not once per micro-batch (accumulation = 2)
    lora_ids = sorted(map(id, trained_run.lora_params))
    max_norm = TRAIN_RUN["MAX_GRAD_NORM"]
    for c in calls:
        assert c["sync"], "clipped on a micro-batch that does not step the optimizer"
        assert sorted(c["param_ids"]) == lora_ids, "clip_grad_norm_ did not get exactly the LoRA tensors"
        assert c["max_norm"] == pytest.approx(max_norm)
        assert c["post"] <= max_norm * (1 + 1e-4)
        assert c["returned"] == pytest.approx(c["pre"], rel=1e-4)
    # the norm was above the limit before clipping: clipping really happened, in every step here
    assert all(c["pre"] > max_norm for c in calls), [round(c["pre"], 4) for c in calls]


# ----------------------------------------------------------------------------- 8. the file reloads
@pytest.fixture(scope="module")
def reloaded_pipeline(trained_run, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    with capture_library_messages() as messages:
        pipe.load_lora_weights(trained_run.output_dir)
    pipe.unet.eval()
    return pipe, messages


def unet_out(unet, inputs):
    z, t, c = inputs
    with torch.no_grad():
        return unet(z, t, c, return_dict=False)[0]


def test_saved_file_metadata_records_rank_and_alpha(trained_run):
    path = os.path.join(trained_run.output_dir, lce.WEIGHTS_NAME)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["unet.r"] == TRAIN_RUN["LORA_RANK"] == 4
    assert adapter["unet.lora_alpha"] == TRAIN_RUN["LORA_ALPHA"] == 8
    assert sorted(adapter["unet.target_modules"]) == sorted(lce.TARGET_MODULES)
    assert json.loads(meta["training_config"]) == trained_run.cfg.as_dict()
    # the file holds exactly the trained LoRA tensors, in fp32, under diffusers' names
    expected = lce.lora_state_dict(trained_run.unet)
    assert sorted(keys) == sorted(expected)
    tensors = load_file(path)
    for k, v in expected.items():
        assert tensors[k].dtype == torch.float32
        assert torch.equal(tensors[k], v), k


def test_saved_file_reproduces_the_trained_unet_in_a_fresh_pipeline(trained_run, reloaded_pipeline):
    pipe, messages = reloaded_pipeline
    inputs = fixed_unet_inputs(trained_run.unet)
    y_trained = unet_out(trained_run.unet, inputs)
    y_loaded = unet_out(pipe.unet, inputs)
    tol = 1e-5 * max(1.0, y_trained.abs().max().item())
    diff = (y_loaded - y_trained).abs().max().item()
    assert diff <= tol, f"reloaded LoRA differs from the trained model by {diff:.3g}"
    # ... and the LoRA matters: the comparison is not between two copies of the base model
    trained_run.unet.disable_adapters()
    try:
        y_base = unet_out(trained_run.unet, inputs)
    finally:
        trained_run.unet.enable_adapters()
    assert (y_trained - y_base).abs().max().item() > 1000 * tol
    # the loaded adapter runs at the trained strength alpha / r = 2
    scales = {m.scaling[a] for m in pipe.unet.modules() if hasattr(m, "scaling") for a in m.scaling}
    assert scales == {TRAIN_RUN["LORA_ALPHA"] / TRAIN_RUN["LORA_RANK"]}
    assert key_complaints(messages) == [], messages


def test_alpha_metadata_matters_same_weights_at_scale_one_differ(trained_run, tmp_path, tiny_model_dir):
    """Without the alpha metadata diffusers would assume alpha = r (scale 1, not 2): the output
    would differ. So the metadata in our file is what makes the reload exact."""
    from diffusers import StableDiffusionPipeline

    src = os.path.join(trained_run.output_dir, lce.WEIGHTS_NAME)
    save_file(load_file(src), str(tmp_path / lce.WEIGHTS_NAME), metadata={"format": "pt"})
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.load_lora_weights(str(tmp_path))
    pipe.unet.eval()
    scales = {m.scaling[a] for m in pipe.unet.modules() if hasattr(m, "scaling") for a in m.scaling}
    assert scales == {1.0}
    inputs = fixed_unet_inputs(trained_run.unet)
    y_trained = unet_out(trained_run.unet, inputs)
    y_scale1 = unet_out(pipe.unet, inputs)
    assert (y_scale1 - y_trained).abs().max().item() > 1e-3


def test_key_complaint_capture_works(trained_run, tmp_path, tiny_model_dir):
    """Negative control for the 'no key complaints' assertions: a file missing one tensor is
    reported by diffusers, and capture_library_messages sees it."""
    from diffusers import StableDiffusionPipeline

    tensors = load_file(os.path.join(trained_run.output_dir, lce.WEIGHTS_NAME))
    with safe_open(os.path.join(trained_run.output_dir, lce.WEIGHTS_NAME), "pt") as f:
        meta = f.metadata()
    dropped = sorted(k for k in tensors if "lora.up" in k or "lora_B" in k)[0]
    del tensors[dropped]
    save_file(tensors, str(tmp_path / lce.WEIGHTS_NAME), metadata=meta)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    with capture_library_messages() as messages:
        try:
            pipe.load_lora_weights(str(tmp_path))
        except Exception as e:  # refusing the file outright is also a complaint
            messages.append(f"missing key error: {e}")
    assert key_complaints(messages), messages
