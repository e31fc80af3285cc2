"""What a run shows its user besides the adapter: the validation grid, comparison.png, metrics.jsonl and
loss_curve.png, the rank spectrum, TensorBoard, the printed recipe that renders test_generation.png
again, the speed/precision knobs of a bf16 run (VAE_FP32, the fp32-fused merged model),
compare_runs.py, and the LoRA switch of benchmarks/demo_diagnosis.py."""
import json
import math
import os
import re

import pytest
import torch
from PIL import Image

import compare_runs
import lora_complete_example as lce
from conftest import FEATURE_RUN, REPO_ROOT, fresh_pipe, lora_weights, maxdiff, pixel_diff, read_safetensors, reference_unet, render, run_main
from lora_tools.config import UserError

R = FEATURE_RUN


def metrics(run):
    with open(os.path.join(run.out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def cosine_with_warmup(step, warmup, total):
    """The multiplier of diffusers' 'cosine' schedule (num_cycles=0.5) after `step` scheduler steps."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def recipe(log):
    """The plain-diffusers lines the script printed under 'reproduce it with plain diffusers:'."""
    lines = log.split("reproduce it with plain diffusers:\n", 1)[1].splitlines()
    code = []
    for line in lines:
        if not line.startswith("  "):
            break
        code.append(line[2:])
    return "\n".join(code)


def run_recipe(log):
    namespace = {}
    exec(recipe(log), namespace)  # noqa: S102 -- the script's own printed lines, as a user would paste them
    return namespace["image"]


# ----------------------------------------------------------------------------- pictures of the feature run
def test_validation_grid_shows_the_model_at_its_step(feature_run, tiny_model_dir):
    from lora_tools.pictures import image_grid

    cfg = feature_run.cfg
    assert sorted(os.listdir(os.path.join(feature_run.out, "validation"))) == ["step-000005.png"]  # not at the last step
    seeds, prompts = [cfg.SEED, cfg.SEED + 1], list(cfg.VALIDATION_PROMPTS)
    # its cells are the model being trained at step 5 (UNet and text encoder) = checkpoint-5 rendered by plain diffusers
    pipe = fresh_pipe(tiny_model_dir, os.path.join(feature_run.out, "checkpoint-5"))
    expected = image_grid([render(pipe, cfg, p, s) for p in prompts for s in seeds], rows=len(prompts),
                          labels=[f"seed {s}" for s in seeds], row_labels=prompts)
    assert pixel_diff(os.path.join(feature_run.out, "validation", "step-000005.png"), expected) <= 1


def test_comparison_image_rows_are_base_and_base_plus_lora(feature_run, tiny_model_dir):
    from lora_tools.pictures import comparison_image

    cfg, prompts = feature_run.cfg, list(feature_run.cfg.VALIDATION_PROMPTS)
    base = [render(fresh_pipe(tiny_model_dir), cfg, p) for p in prompts]
    tuned = [render(fresh_pipe(tiny_model_dir, feature_run.out), cfg, p) for p in prompts]
    assert any(pixel_diff(b, t) > 10 for b, t in zip(base, tuned))  # the rows differ
    expected = comparison_image({"base model": base, "base + LoRA": tuned}, prompts)
    assert pixel_diff(os.path.join(feature_run.out, "comparison.png"), expected) <= 1


def test_metrics_follow_the_schedule_per_step_and_epoch_and_the_loss_curve_draws_them(feature_run, tmp_path):
    from lora_tools.pictures import read_metrics, save_loss_curve

    records = metrics(feature_run)  # LOG_EVERY=1: one line per optimizer step
    # 8 images / batch 4 = 2 steps an epoch; the lr used by step s is the schedule after s - 1 scheduler steps
    assert [(r["step"], r["epoch"]) for r in records] == [(s, (s - 1) // 2) for s in range(1, R["STEPS"] + 1)]
    for r in records:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["lr"] == pytest.approx(R["LR"] * cosine_with_warmup(r["step"] - 1, R["WARMUP"], R["STEPS"]), rel=1e-9, abs=1e-15)
    assert len({r["lr"] for r in records}) > 3  # the schedule really moved
    again = str(tmp_path / "loss.png")
    save_loss_curve(read_metrics(os.path.join(feature_run.out, "metrics.jsonl")), again)
    assert pixel_diff(os.path.join(feature_run.out, "loss_curve.png"), again) == 0


def test_rank_spectrum_table_and_plot_are_those_of_the_saved_adapter(feature_run, tiny_model_dir, tmp_path):
    from lora_tools.pictures import save_spectrum_plot
    from lora_tools.spectrum import lora_updates, spectrum_table

    unet = reference_unet(tiny_model_dir, feature_run.out, feature_run.cfg)
    rows, text = spectrum_table(lora_updates(unet))
    assert text in feature_run.log  # printed
    groups = {}  # block + attention kind of every adapted layer, worked out from the names alone
    for name in lora_updates(unet):
        parts = name.split(".")
        key = ("mid_block" if parts[0] == "mid_block" else f"{parts[0]}.{parts[1]}") + " " + next(p for p in parts if p.startswith("attn"))
        groups[key] = groups.get(key, 0) + 1
    order = sorted(groups, key=lambda g: (["down", "mid", "up"].index(g.split("_")[0]), g))
    table = text.splitlines()  # title, header, rule, then one row per group
    assert set(table[2]) == {"-"} and len(table[3:]) == len(rows) == len(groups) == 14  # down 0-2, mid, up 1-3 x attn1/2
    assert [r["group"] for r in rows] == order
    for line, r in zip(table[3:], rows):
        assert " ".join(line.split()[:2]) == r["group"] and int(line.split()[2]) == r["matrices"] == groups[r["group"]]
    save_spectrum_plot(rows, str(tmp_path / "spectrum.png"))
    assert pixel_diff(os.path.join(feature_run.out, "rank_spectrum.png"), str(tmp_path / "spectrum.png")) == 0


# ----------------------------------------------------------------------------- metrics.jsonl and TensorBoard
def test_a_metrics_line_is_the_mean_loss_of_its_log_every_steps(two_loras, rerun_of_first_lora):
    """The first small LoRA (LOG_EVERY=1) again, logging every 3 steps (conftest.rerun_of_first_lora)."""
    per_step = metrics(two_loras["my_lora_model"])
    assert [r["step"] for r in per_step] == [1, 2, 3, 4]
    lines = metrics(rerun_of_first_lora)
    assert [(r["step"], r["epoch"], r["lr"]) for r in lines] == [(3, 1, 1e-3), (4, 1, 1e-3)]  # and the last step
    assert lines[0]["loss"] == pytest.approx(sum(r["loss"] for r in per_step[:3]) / 3, rel=1e-6)
    assert lines[1]["loss"] == pytest.approx(per_step[3]["loss"], rel=1e-6)
    assert max(r["loss"] for r in per_step[:3]) - min(r["loss"] for r in per_step[:3]) > 1e-4  # a mean, not any one step


def test_tensorboard_gets_the_metrics_lines(rerun_of_first_lora):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = sorted({root for root, _, files in os.walk(os.path.join(rerun_of_first_lora.out, "logs"))
                         for f in files if f.startswith("events.out.tfevents")})
    accumulators = []
    for d in event_dirs:  # accelerate writes the scalars in logs/lora and the hparams in a subfolder
        acc = EventAccumulator(d)
        acc.Reload()
        if "loss" in acc.Tags()["scalars"]:
            accumulators.append(acc)
    assert len(accumulators) == 1, event_dirs
    for tag in ("loss", "lr"):
        events = accumulators[0].Scalars(tag)
        assert [(e.step, e.value) for e in events] == [(r["step"], pytest.approx(r[tag], rel=1e-6)) for r in metrics(rerun_of_first_lora)]


# ----------------------------------------------------------------------------- the printed recipe
def test_the_printed_recipe_renders_the_test_image_again(two_loras):
    run = two_loras["my_lora_model"]  # α = 8 != r = 4: the strength comes from the file's metadata
    assert "dtype=torch.float32" in recipe(run.log) and ".to('cpu')" in recipe(run.log)
    image = run_recipe(run.log)
    assert pixel_diff(os.path.join(run.out, "test_generation.png"), image) <= 1
    # non-vacuous: the same call without the LoRA renders another picture
    assert pixel_diff(render(fresh_pipe(run.cfg.MODEL_ID), run.cfg), image) > 1


# ----------------------------------------------------------------------------- a bf16 run and its knobs
@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, tiny_args):
    """MIXED_PRECISION=bf16 with VAE_FP32, GRADIENT_CHECKPOINTING and the merged model; the library
    calls these knobs must reach are counted. (COMPILE: see test_multiprocess.py.)"""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    seen = dict(checkpointing=0, vae_dtypes=set())
    real_enable, real_encode = UNet2DConditionModel.enable_gradient_checkpointing, AutoencoderKL.encode

    def enable(self, *a, **k):
        seen["checkpointing"] += 1
        return real_enable(self, *a, **k)

    def encode(self, *a, **k):
        seen["vae_dtypes"].add(self.dtype)
        return real_encode(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(UNet2DConditionModel, "enable_gradient_checkpointing", enable)
        mp.setattr(AutoencoderKL, "encode", encode)
        run = run_main(tiny_args(f"--OUTPUT_DIR={tmp_path_factory.mktemp('bf16') / 'out'}", "--MIXED_PRECISION=bf16",
                                 "--VAE_FP32=True", "--GRADIENT_CHECKPOINTING=True", "--SAVE_MERGED_MODEL=True",
                                 "--MAX_TRAIN_STEPS=2", "--LORA_ALPHA=8"))
    run.seen = seen
    return run


def test_the_knobs_reach_the_models_and_the_file_is_fp32(bf16_run):
    assert bf16_run.seen["checkpointing"] == 1
    assert bf16_run.seen["vae_dtypes"] == {torch.float32}  # VAE_FP32 under bf16, when caching
    assert "mixed precision: bf16 (frozen weights in torch.bfloat16, LoRA weights in fp32)" in bf16_run.log
    tensors = lora_weights(bf16_run.out)
    assert tensors and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    assert re.search(r"^reload check: .* = \S+ \(LoRA's own effect \S+\)$", bf16_run.log, re.M)


def test_vae_fp32_decodes_the_bf16_latents_in_fp32_and_the_recipe_does_the_same(bf16_run, tiny_model_dir):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    cfg = bf16_run.cfg
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, safety_checker=None)
    pipe.load_lora_weights(bf16_run.out)
    latents = pipe(cfg.VALIDATION_PROMPTS[0], height=64, width=64, num_inference_steps=cfg.NUM_INFERENCE_STEPS,
                   guidance_scale=cfg.GUIDANCE_SCALE, generator=torch.Generator().manual_seed(cfg.SEED), output_type="latent").images
    assert latents.dtype == torch.bfloat16
    vae32 = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae")
    with torch.no_grad():
        fp32_decode = pipe.image_processor.postprocess(vae32.decode(latents.float() / vae32.config.scaling_factor).sample)[0]
        bf16_decode = pipe.image_processor.postprocess(pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.float())[0]
    written = os.path.join(bf16_run.out, "test_generation.png")
    assert pixel_diff(written, fp32_decode) <= 1
    assert pixel_diff(bf16_decode, fp32_decode) > 1  # a bf16 VAE (what VAE_FP32 avoids) would show
    lines = recipe(bf16_run.log)
    assert "dtype=torch.bfloat16" in lines and "vae=AutoencoderKL.from_pretrained(" in lines and "output_type='latent'" in lines
    assert pixel_diff(written, run_recipe(bf16_run.log)) <= 1


def test_merged_model_is_fused_in_fp32_and_saved_in_save_dtype(bf16_run, tiny_model_dir):
    """W = W0 + (α/r)·B·A in fp32 for every adapted layer (a bf16 fusion would round most of this
    small update away), every other weight W0 as it was, all in SAVE_DTYPE (fp32)."""
    from diffusers import UNet2DConditionModel

    merged, _ = read_safetensors(os.path.join(bf16_run.out, "merged_pipeline", "unet", "diffusion_pytorch_model.safetensors"))
    base = dict(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").named_parameters())
    tensors, scale = lora_weights(bf16_run.out), 8 / 4
    assert merged.keys() == base.keys()
    adapted, rounded_away = 0, 0
    for name, w in merged.items():
        assert w.dtype == torch.float32, name
        module = name[:-len(".weight")]
        if f"unet.{module}.lora.down.weight" not in tensors:
            assert torch.equal(w, base[name]), name
            continue
        delta = scale * (tensors[f"unet.{module}.lora.up.weight"] @ tensors[f"unet.{module}.lora.down.weight"])
        assert maxdiff(w, base[name] + delta) <= 1e-6, name
        adapted += 1
        rounded_away += int(((base[name].bfloat16() + delta.bfloat16()) == base[name].bfloat16()).logical_and(delta != 0).sum())
    assert adapted == sum(1 for k in tensors if k.endswith(".lora.down.weight")) > 0
    assert rounded_away > 0  # in bf16 part of this update would have vanished


# ----------------------------------------------------------------------------- compare_runs.py
def test_compare_runs_stacks_one_labelled_row_per_run(two_loras, tmp_path):
    from lora_tools.pictures import image_grid

    folders = [two_loras[name].out for name in ("my_lora_model", "my_second_lora_model")]
    out = str(tmp_path / "ranks.png")
    compare_runs.main([*folders, f"--OUT={out}"])
    configs = [json.load(open(os.path.join(f, "training_config.json"))) for f in folders]
    sizes = [os.path.getsize(os.path.join(f, lce.WEIGHTS_NAME)) for f in folders]
    labels = compare_runs.row_labels(configs, sizes)
    assert labels[0].startswith("LOG_EVERY=1, LORA_ALPHA=8, LORA_RANK=4, SEED=42 (")
    assert labels[1].startswith("LOG_EVERY=5, LORA_ALPHA=4, LORA_RANK=8, SEED=7 (") and sizes[1] > sizes[0]
    expected = image_grid([Image.open(os.path.join(f, "comparison.png")) for f in folders], rows=2, row_labels=labels)
    assert pixel_diff(out, expected) == 0
    with pytest.raises(UserError, match="not a finished run folder"):
        compare_runs.main([folders[0], str(tmp_path)])
    with pytest.raises(UserError, match="at least two"):
        compare_runs.main([folders[0]])


# ----------------------------------------------------------------------------- benchmarks/demo_diagnosis.py
def test_diagnosis_switches_the_lora_on_for_exactly_the_steps_it_names(two_loras):
    """demo_diagnosis.render(lora_steps=...) switches the LoRA between sampler steps: no steps = the base
    model's pictures, every step = base + LoRA's, and the first step alone = neither."""
    import importlib.util

    import numpy as np
    from diffusers import StableDiffusionPipeline

    spec = importlib.util.spec_from_file_location("demo_diagnosis", os.path.join(REPO_ROOT, "benchmarks", "demo_diagnosis.py"))
    D = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(D)
    run = two_loras["my_lora_model"]
    pipe = StableDiffusionPipeline.from_pretrained(run.cfg.MODEL_ID, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(run.out, adapter_name="lora")
    pipe.set_adapters(["lora"], adapter_weights=[20.0])  # a 4-step LoRA, made loud enough to show in 8-bit pixels
    pixels = lambda images: np.stack([np.asarray(im, dtype=np.int16) for im in images])  # noqa: E731
    prompts, seeds = ["a red circle", "a blue square"], [0]
    pipe.disable_lora()
    base = pixels(pipe(prompts, generator=[torch.Generator().manual_seed(0) for _ in prompts], num_inference_steps=D.STEPS,
                       guidance_scale=D.GUIDANCE, height=64, width=64).images)
    pipe.enable_lora()
    tuned = pixels(pipe(prompts, generator=[torch.Generator().manual_seed(0) for _ in prompts], num_inference_steps=D.STEPS,
                        guidance_scale=D.GUIDANCE, height=64, width=64).images)
    assert np.abs(tuned - base).max() > 10  # the LoRA shows
    assert np.array_equal(pixels(D.render(pipe, prompts, seeds, lora_steps=set())), base)
    assert np.array_equal(pixels(D.render(pipe, prompts, seeds)), tuned)
    first = pixels(D.render(pipe, prompts, seeds, lora_steps={0}))
    assert not np.array_equal(first, base) and not np.array_equal(first, tuned)
