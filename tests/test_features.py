"""Beyond one adapter: text-encoder LoRA, metadata in both files, fp16 files, combining two LoRAs,
merging, DoRA / rsLoRA / LoRA+ / Min-SNR-γ / offset noise, the run's pictures, TensorBoard,
several processes and the rank spectrum.

Every training run is lce.main in this process on the conftest tiny model and data, with spies on
the script's own functions (they receive the trained models, the optimizer, the config); each run
is a module-scoped fixture shared by the tests that check it. Runs:

  A   text encoder + LoRA+ (16) + its own text-encoder rate + cosine/warm-up, r=4, α=8, 10 steps,
      validation grid at step 5, checkpoint at step 5, merged pipeline
  A2  A resumed from A's checkpoint-5 in another folder
  P   plain UNet LoRA, fp32 (adapter "a" of the combination)
  F   plain UNet LoRA, SAVE_DTYPE=fp16, another seed (adapter "b")
  D   DoRA;   R   rsLoRA
and one `accelerate launch` with two CPU processes, started first and run in the background.
"""
import contextlib
import datetime
import importlib.util
import io
import json
import math
import os
import re
import struct
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import lora_complete_example as lce
from conftest import REPO_ROOT, capture_library_messages, fixed_unet_inputs, key_complaints, subprocess_env
from lora_tools.config import UserError

SCRIPT_NAME = os.path.basename(lce.__file__)
WEBUI_NAME = "my_lora.safetensors"  # OUTPUT_NAME's default + .safetensors
RANK, ALPHA = 4, 8


# =============================================================================
# helpers
# =============================================================================
def base_argv(model_dir, data_dir, out, *extra):
    return [f"--MODEL_ID={model_dir}", f"--DATA_DIR={data_dir}", f"--OUTPUT_DIR={out}", "--RESOLUTION=64",
            "--MIXED_PRECISION=no", "--BATCH_SIZE=4", "--GRADIENT_ACCUMULATION_STEPS=1", "--LEARNING_RATE=1e-3",
            "--LOG_EVERY=5", "--NUM_INFERENCE_STEPS=2", f"--LORA_RANK={RANK}", f"--LORA_ALPHA={ALPHA}", *extra]


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def fixed_inputs(vocab_size=514):
    """(z, t, c) for the UNet and token ids for the text encoder, fixed."""
    z, t, c = fixed_unet_inputs(SimpleNamespace(config=SimpleNamespace(in_channels=4, cross_attention_dim=32)))
    ids = torch.randint(2, vocab_size, (2, 77), generator=torch.Generator().manual_seed(77))
    return z, t, c, ids


@torch.no_grad()
def model_outputs(unet, text_encoder, inputs):
    """UNet output and text-encoder last_hidden_state on the fixed inputs, in eval mode (the models'
    modes are restored afterwards)."""
    z, t, c, ids = inputs
    modes = [(m, m.training) for m in (unet, text_encoder) if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        y = unet(z, t, c, return_dict=False)[0].detach().clone()
        h = text_encoder(ids).last_hidden_state.detach().clone() if text_encoder is not None else None
    finally:
        for m, mode in modes:
            m.train(mode)
    return y, h


def fresh_pipe(model_dir, lora_dir=None, **load_kwargs):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, **load_kwargs)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return pipe


def pipe_outputs(pipe, inputs):
    return model_outputs(pipe.unet, pipe.text_encoder, inputs)


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def tol(ref, rel=1e-5):
    return rel * max(1.0, ref.abs().max().item())


def assert_close(actual, expected, rel=1e-5, what=""):
    d, t = maxdiff(actual, expected), tol(expected, rel)
    assert d <= t, f"{what}: max |diff| {d:.3g} > {t:.3g}"


def read_file(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def tensor_bytes(path):
    """Bytes of a safetensors file's tensor data (file size minus the 8-byte length and the header)."""
    with open(path, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    return os.path.getsize(path) - 8 - header


def png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def pil_array(img):
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def render(pipe, prompt, seed, cfg):
    """Plain diffusers, as the script's printed reproduction line says."""
    return pipe(prompt, height=cfg.RESOLUTION, width=cfg.RESOLUTION, num_inference_steps=cfg.NUM_INFERENCE_STEPS,
                guidance_scale=cfg.GUIDANCE_SCALE, generator=torch.Generator().manual_seed(seed)).images[0]


def lora_pair(tensors, module, prefix="unet"):
    """(down = A (r x in), up = B (out x r)) of one adapted layer in a diffusers-format LoRA file."""
    keys = [k for k in tensors if k.startswith(f"{prefix}.{module}.")]
    down = [k for k in keys if k.endswith((".down.weight", ".lora_A.weight"))]
    up = [k for k in keys if k.endswith((".up.weight", ".lora_B.weight"))]
    assert len(keys) == 2 and len(down) == len(up) == 1, keys
    return tensors[down[0]].float(), tensors[up[0]].float()


def cosine_with_warmup(step, warmup, total):
    """The multiplier of diffusers' 'cosine' schedule (num_cycles=0.5) after `step` scheduler steps."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def lora_layer_names(model):
    from peft.tuners.lora import LoraLayer

    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


# =============================================================================
# one in-process run with spies
# =============================================================================
@contextlib.contextmanager
def spies(rec):
    """Record what lce.main hands to its own functions: the LoRA tensors right after injection, the
    optimizer, the lr of every group at every optimizer step, the trained models when the final file
    is saved (with their outputs on fixed inputs at that moment) and the unet report_rank_spectrum sees."""
    from accelerate import Accelerator

    from lora_tools.pictures import lora_updates, spectrum_table

    real = {n: getattr(lce, n) for n in ("add_lora", "add_text_encoder_lora", "make_optimizer", "save_lora",
                                          "report_rank_spectrum")}
    real_clip = Accelerator.clip_grad_norm_

    def add_lora(unet, cfg):
        params = real["add_lora"](unet, cfg)
        rec.unet_initial = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
        return params

    def add_te(text_encoder, cfg):
        params = real["add_text_encoder_lora"](text_encoder, cfg)
        rec.te_initial = {n: p.detach().clone() for n, p in text_encoder.named_parameters() if p.requires_grad}
        rec.te_params = list(params)
        return params

    def make_optimizer(params, cfg, cuda):
        opt = real["make_optimizer"](params, cfg, cuda)
        rec.optimizer = opt
        rec.groups_given = [dict(ids=[id(p) for p in g["params"]], lr=g["lr"]) for g in params] \
            if params and isinstance(params[0], dict) else None
        return opt

    def clip(self, parameters, max_norm, norm_type=2):
        if getattr(rec, "optimizer", None) is not None:
            rec.step_lrs.append([g["lr"] for g in rec.optimizer.param_groups])
        return real_clip(self, parameters, max_norm, norm_type)

    def save_lora(path, unet, cfg, text_encoder=None, dtype=None):
        n = real["save_lora"](path, unet, cfg, text_encoder, dtype)
        if os.path.abspath(path) == os.path.abspath(os.path.join(cfg.OUTPUT_DIR, lce.WEIGHTS_NAME)):
            rec.cfg, rec.unet, rec.text_encoder = cfg, unet, text_encoder
            rec.final_sd = {k: v.clone() for k, v in lce.lora_state_dict(unet, text_encoder).items()}
            rec.outputs = model_outputs(unet, text_encoder, rec.inputs)
            if not cfg.USE_DORA:
                unet.disable_adapters()
                try:
                    rec.base_unet_output = model_outputs(unet, None, rec.inputs)[0]
                finally:
                    unet.enable_adapters()
        return n

    def report(cfg, unet):
        rec.spectrum_unet = unet
        if not cfg.USE_DORA:
            rec.expected_rows, rec.expected_text = spectrum_table(lora_updates(unet))
        return real["report_rank_spectrum"](cfg, unet)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lce, "add_lora", add_lora)
        mp.setattr(lce, "add_text_encoder_lora", add_te)
        mp.setattr(lce, "make_optimizer", make_optimizer)
        mp.setattr(lce, "save_lora", save_lora)
        mp.setattr(lce, "report_rank_spectrum", report)
        mp.setattr(Accelerator, "clip_grad_norm_", clip)
        yield


def run(argv, output_dir):
    """lce.main(argv) in this process with the spies; the error (if any) is recorded, and asserted
    by the tests through `ok(rec)`."""
    rec = SimpleNamespace(argv=argv, out=output_dir, error=None, step_lrs=[], inputs=fixed_inputs())
    buf = io.StringIO()
    rec.t0 = time.time()
    try:
        with spies(rec), contextlib.redirect_stdout(buf):
            lce.main(argv)
    except Exception as e:  # noqa: BLE001 -- asserted by ok()
        rec.error = e
    finally:
        reset_accelerate()
        rec.t1 = time.time()
        rec.log = buf.getvalue()
    return rec


def ok(rec):
    assert rec.error is None, f"lce.main failed: {rec.error!r}\n{rec.log[-3000:]}"
    return rec


# =============================================================================
# the runs
# =============================================================================
A_STEPS, A_WARMUP, A_LR, A_TE_LR, A_RATIO = 10, 2, 1e-3, 3e-4, 16.0
A_EXTRA = ["--TRAIN_TEXT_ENCODER=True", f"--MAX_TRAIN_STEPS={A_STEPS}", "--CHECKPOINTING_STEPS=5",
           "--LR_SCHEDULER=cosine", f"--LR_WARMUP_STEPS={A_WARMUP}", f"--LORAPLUS_LR_RATIO={A_RATIO:g}",
           f"--TEXT_ENCODER_LEARNING_RATE={A_TE_LR:g}"]


@pytest.fixture(scope="module")
def multi_process(tmp_path_factory):
    """`accelerate launch` with two CPU processes, started at once (it runs in the background while
    the in-process runs work) and awaited by its test."""
    out = str(tmp_path_factory.mktemp("ddp") / "out")
    logs = tmp_path_factory.mktemp("ddp_log")
    log, err = str(logs / "stdout.txt"), str(logs / "stderr.txt")
    # `--multi_gpu` on a machine without CUDA: accelerate starts the processes with torchrun and the
    # script's Accelerator(cpu=True) joins them with gloo. (`--cpu --num_processes 2` would start ONE
    # process in accelerate 1.15: its simple launcher only spreads CPU jobs through mpirun.)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT_NAME, "--DEMO=True", "--MAX_TRAIN_STEPS=4",
           "--NUM_INFERENCE_STEPS=2", f"--OUTPUT_DIR={out}"]
    env = subprocess_env()
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    with open(log, "w") as f, open(err, "w") as e:  # apart: progress bars on stderr do not end in newlines
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=e)
    handle = SimpleNamespace(proc=proc, out=out, log=log, err=err, cmd=cmd)
    yield handle
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module", autouse=True)
def _start_multi_process_first(request):
    """Start the two-process run before the first test of this module (when its test is selected),
    so that it overlaps with the in-process runs."""
    if any(item.name == "test_two_processes_share_the_data_and_write_one_file" for item in request.session.items):
        request.getfixturevalue("multi_process")


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    out = str(tmp_path_factory.mktemp("runA") / "out")
    return run(base_argv(tiny_model_dir, tiny_data_dir, out, *A_EXTRA, "--VALIDATION_STEPS=5",
                         "--SAVE_MERGED_MODEL=True"), out)


@pytest.fixture(scope="module")
def run_a2(run_a, tmp_path_factory, tiny_model_dir, tiny_data_dir):
    ok(run_a)
    out = str(tmp_path_factory.mktemp("runA2") / "out")
    ckpt = os.path.join(run_a.out, "checkpoint-5")
    return run(base_argv(tiny_model_dir, tiny_data_dir, out, *A_EXTRA, f"--RESUME_FROM={ckpt}"), out)


@pytest.fixture(scope="module")
def run_p(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    out = str(tmp_path_factory.mktemp("runP") / "out")
    return run(base_argv(tiny_model_dir, tiny_data_dir, out, "--MAX_TRAIN_STEPS=3", "--SEED=42",
                         "--LEARNING_RATE=1e-2"), out)


@pytest.fixture(scope="module")
def run_f(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    out = str(tmp_path_factory.mktemp("runF") / "out")
    return run(base_argv(tiny_model_dir, tiny_data_dir, out, "--MAX_TRAIN_STEPS=3", "--SEED=7",
                         "--LEARNING_RATE=1e-2", "--SAVE_DTYPE=fp16"), out)


@pytest.fixture(scope="module")
def run_b(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    out = str(tmp_path_factory.mktemp("runB") / "out")
    return run(base_argv(tiny_model_dir, tiny_data_dir, out, "--MAX_TRAIN_STEPS=3", "--SEED=7",
                         "--LEARNING_RATE=1e-2"), out)


@pytest.fixture(scope="module")
def run_d(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    out = str(tmp_path_factory.mktemp("runD") / "out")
    return run(base_argv(tiny_model_dir, tiny_data_dir, out, "--MAX_TRAIN_STEPS=3", "--USE_DORA=True",
                         "--LEARNING_RATE=1e-2"), out)


@pytest.fixture(scope="module")
def run_r(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    out = str(tmp_path_factory.mktemp("runR") / "out")
    return run(base_argv(tiny_model_dir, tiny_data_dir, out, "--MAX_TRAIN_STEPS=3", "--USE_RSLORA=True",
                         "--LEARNING_RATE=1e-2"), out)


@pytest.fixture(scope="module")
def loaded_a(run_a, tiny_model_dir):
    """Fresh pipelines with A's two files loaded (plain diffusers), and the base pipeline."""
    ok(run_a)
    with capture_library_messages() as messages:
        diffusers_pipe = fresh_pipe(tiny_model_dir, run_a.out)
        webui_pipe = fresh_pipe(tiny_model_dir, run_a.out, weight_name=WEBUI_NAME)
    return SimpleNamespace(diffusers=diffusers_pipe, webui=webui_pipe, base=fresh_pipe(tiny_model_dir),
                           messages=messages)


# =============================================================================
# 1. text-encoder LoRA
# =============================================================================
def test_text_encoder_run_completes_and_writes_both_parts(run_a):
    ok(run_a)
    tensors, meta = read_file(os.path.join(run_a.out, lce.WEIGHTS_NAME))
    unet_keys = [k for k in tensors if k.startswith("unet.")]
    te_keys = [k for k in tensors if k.startswith("text_encoder.")]
    assert unet_keys and te_keys and len(unet_keys) + len(te_keys) == len(tensors)
    # the file holds exactly the trained tensors (both models), in fp32
    assert tensors.keys() == run_a.final_sd.keys()
    for k, v in run_a.final_sd.items():
        assert tensors[k].dtype == torch.float32 and torch.equal(tensors[k], v), k
    # one A and one B per adapted CLIP projection: 2 layers x 4 targets
    n_te_layers = len(lora_layer_names(run_a.text_encoder))
    assert n_te_layers == 2 * len(lce.TEXT_ENCODER_TARGET_MODULES) and len(te_keys) == 2 * n_te_layers
    # metadata for both parts
    adapter = json.loads(meta["lora_adapter_metadata"])
    for part, targets in (("unet", lce.TARGET_MODULES), ("text_encoder", lce.TEXT_ENCODER_TARGET_MODULES)):
        assert adapter[f"{part}.r"] == RANK and adapter[f"{part}.lora_alpha"] == ALPHA, part
        assert sorted(adapter[f"{part}.target_modules"]) == sorted(targets), part
        assert adapter[f"{part}.use_dora"] is False and adapter[f"{part}.use_rslora"] is False


def test_diffusers_file_restores_unet_and_text_encoder(run_a, loaded_a):
    y_trained, h_trained = run_a.outputs
    y, h = pipe_outputs(loaded_a.diffusers, run_a.inputs)
    assert_close(y, y_trained, what="UNet, diffusers file")
    assert_close(h, h_trained, what="text encoder, diffusers file")
    # the adapters matter: neither comparison is between two base models
    y0, h0 = pipe_outputs(loaded_a.base, run_a.inputs)
    assert maxdiff(y_trained, y0) > 100 * tol(y_trained) and maxdiff(h_trained, h0) > 100 * tol(h_trained)
    assert key_complaints(loaded_a.messages) == [], loaded_a.messages


def test_webui_file_loads_to_the_same_unet_and_text_encoder(run_a, loaded_a):
    """The issue's 'done when': two files that diffusers loads to the same model."""
    tensors, _ = read_file(os.path.join(run_a.out, WEBUI_NAME))
    assert any(k.startswith("lora_unet_") for k in tensors) and any(k.startswith("lora_te_") for k in tensors)
    y_trained, h_trained = run_a.outputs
    y, h = pipe_outputs(loaded_a.webui, run_a.inputs)
    assert_close(y, y_trained, what="UNet, WebUI file")
    assert_close(h, h_trained, what="text encoder, WebUI file")
    y_d, h_d = pipe_outputs(loaded_a.diffusers, run_a.inputs)
    assert_close(y, y_d, what="UNet, WebUI vs diffusers file")
    assert_close(h, h_d, what="text encoder, WebUI vs diffusers file")


def test_text_encoder_lora_trains_and_its_frozen_weights_stay_bit_identical(run_a, tiny_model_dir):
    from transformers import CLIPTextModel

    te = run_a.text_encoder
    now = {n: p for n, p in te.named_parameters() if p.requires_grad}
    assert now.keys() == run_a.te_initial.keys() and now
    assert all(".lora_A." in n or ".lora_B." in n for n in now)
    for n, p in now.items():
        assert p.dtype == torch.float32
        assert not torch.equal(p.detach(), run_a.te_initial[n]), f"{n} did not train"
        if ".lora_B." in n:
            assert torch.count_nonzero(run_a.te_initial[n]) == 0, f"{n} did not start at zero"
    # the text encoder's LoRA tensors are optimised: every one is in the optimizer
    opt_ids = {id(p) for g in run_a.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in now.values()} <= opt_ids
    # every frozen tensor equals the checkpoint on disk, bit for bit
    fresh = dict(CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder").named_parameters())
    frozen = {n.replace(".base_layer.", "."): p for n, p in te.named_parameters() if ".lora_" not in n}
    assert frozen.keys() == fresh.keys()
    for n, p in frozen.items():
        assert not p.requires_grad and p.grad is None, n
        assert torch.equal(p.detach(), fresh[n].detach()), f"{n} changed during training"


def test_resume_includes_the_text_encoder(run_a, run_a2):
    ok(run_a2)
    assert re.search(r"resumed from .*checkpoint-5 at step 5", run_a2.log), run_a2.log[-2000:]
    ckpt, _ = read_file(os.path.join(run_a.out, "checkpoint-5", lce.WEIGHTS_NAME))
    full, _ = read_file(os.path.join(run_a.out, lce.WEIGHTS_NAME))
    resumed, _ = read_file(os.path.join(run_a2.out, lce.WEIGHTS_NAME))
    assert ckpt.keys() == full.keys() == resumed.keys()
    assert any(k.startswith("text_encoder.") for k in ckpt)
    for part in ("unet.", "text_encoder."):
        keys = [k for k in full if k.startswith(part)]
        # steps 6-10 trained this part, so the comparison below is not trivially true
        assert max(maxdiff(full[k], ckpt[k]) for k in keys) > 1e-4, part
        worst = max(maxdiff(full[k], resumed[k]) for k in keys)
        assert worst <= 1e-5, f"{part}: resumed run ends {worst:.3g} away from the uninterrupted one"


# =============================================================================
# 2. metadata in both files
# =============================================================================
def test_diffusers_file_training_config_metadata(run_a):
    _, meta = read_file(os.path.join(run_a.out, lce.WEIGHTS_NAME))
    config = json.loads(meta["training_config"])
    assert config == run_a.cfg.as_dict() == lce.resolve_config(run_a.argv).as_dict()
    assert config["TRAIN_TEXT_ENCODER"] is True and config["LORA_RANK"] == RANK and config["LORA_ALPHA"] == ALPHA
    assert config["LORAPLUS_LR_RATIO"] == A_RATIO and config["TEXT_ENCODER_LEARNING_RATE"] == A_TE_LR
    with open(os.path.join(run_a.out, "training_config.json")) as f:
        assert json.load(f) == config


def test_webui_file_ss_metadata_matches_the_run(run_a, tiny_model_dir, tiny_data_dir):
    import diffusers
    import peft

    cfg = run_a.cfg
    _, meta = read_file(os.path.join(run_a.out, WEBUI_NAME))
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_dim"] == "4" == str(cfg.LORA_RANK)
    assert meta["ss_network_alpha"] == str(cfg.LORA_ALPHA) and float(meta["ss_network_alpha"]) == ALPHA
    # a local model folder is named by its folder name (sd-scripts' convention), a hub id as it is
    assert meta["ss_sd_model_name"] == os.path.basename(os.path.normpath(cfg.MODEL_ID)) == os.path.basename(tiny_model_dir)
    assert meta["ss_seed"] == str(cfg.SEED) == "42"
    assert float(meta["ss_learning_rate"]) == cfg.LEARNING_RATE == A_LR
    assert float(meta["ss_unet_lr"]) == A_LR
    assert float(meta["ss_text_encoder_lr"]) == A_TE_LR
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.resolution"] == "64x64"
    assert meta["ss_steps"] == str(A_STEPS) and meta["ss_max_train_steps"] == str(A_STEPS)
    assert meta["ss_num_train_images"] == "8"
    assert json.loads(meta["ss_dataset_dirs"]) == {os.path.basename(tiny_data_dir): {"n_repeats": 1, "img_count": 8}}
    assert meta["ss_lr_scheduler"] == "cosine" and meta["ss_lr_warmup_steps"] == str(A_WARMUP)
    assert meta["ss_batch_size_per_device"] == "4" and meta["ss_gradient_accumulation_steps"] == "1"
    assert meta["ss_mixed_precision"] == "no" and meta["ss_output_name"] == "my_lora"
    args = json.loads(meta["ss_network_args"])
    assert args["train_text_encoder"] is True and args["loraplus_lr_ratio"] == A_RATIO
    assert sorted(args["text_encoder_target_modules"]) == sorted(lce.TEXT_ENCODER_TARGET_MODULES)
    # date/time keys: within the run
    started, finished = float(meta["ss_training_started_at"]), float(meta["ss_training_finished_at"])
    assert run_a.t0 - 1 <= started <= finished <= run_a.t1 + 1
    assert meta["modelspec.date"] == datetime.datetime.fromtimestamp(int(finished)).isoformat()
    # the package versions the file was made with
    version = meta["lora_complete_example_version"]
    assert f"diffusers {diffusers.__version__}" in version and f"peft {peft.__version__}" in version
    assert f"torch {torch.__version__}" in version


# =============================================================================
# 3. SAVE_DTYPE=fp16
# =============================================================================
def written(rec):
    """The run got as far as writing its final files (they are checked even if a later stage failed;
    whether the run completed is its own test)."""
    assert hasattr(rec, "final_sd"), f"lce.main failed before saving: {rec.error!r}\n{rec.log[-3000:]}"
    return rec


def test_fp16_run_completes(run_f):
    """SAVE_DTYPE=fp16 is a documented setting: main must finish (its own reload check included),
    then draw the pictures and the test image like any run."""
    ok(run_f)
    for name in ("test_generation.png", "comparison.png", "loss_curve.png", "rank_spectrum.png"):
        assert os.path.isfile(os.path.join(run_f.out, name)), name


def test_fp16_files_hold_exactly_the_trained_weights_in_half_the_bytes(run_f, tmp_path):
    from peft.utils import get_peft_model_state_dict

    from lora_tools.kohya import save_kohya_file

    written(run_f)
    assert run_f.cfg.SAVE_DTYPE == "fp16"
    path = os.path.join(run_f.out, lce.WEIGHTS_NAME)
    tensors, _ = read_file(path)
    assert tensors.keys() == run_f.final_sd.keys()
    for k, v in run_f.final_sd.items():
        assert tensors[k].dtype == torch.float16, k
        assert torch.equal(tensors[k], v.half()), k  # the fp32 weights rounded once, nothing else
    # the same model saved in fp32 needs exactly twice the tensor bytes
    fp32_path = str(tmp_path / "fp32.safetensors")
    lce.save_lora(fp32_path, run_f.unet, run_f.cfg, dtype=torch.float32)
    assert 2 * tensor_bytes(path) == tensor_bytes(fp32_path)

    webui = os.path.join(run_f.out, WEBUI_NAME)
    kohya16, _ = read_file(webui)
    assert kohya16 and all(v.dtype == torch.float16 for v in kohya16.values())
    kohya32_path = str(tmp_path / "kohya32.safetensors")
    save_kohya_file(kohya32_path, get_peft_model_state_dict(run_f.unet), {}, ALPHA, ALPHA, {}, torch.float32)
    kohya32 = load_file(kohya32_path)
    assert kohya32.keys() == kohya16.keys()
    for k in kohya32:
        assert torch.equal(kohya16[k], kohya32[k].half()), k
    assert 2 * tensor_bytes(webui) == tensor_bytes(kohya32_path)


def test_fp16_files_load_to_the_trained_outputs(run_f, tiny_model_dir):
    written(run_f)
    y_trained = run_f.outputs[0]
    effect = maxdiff(y_trained, run_f.base_unet_output)
    assert effect > 1e-3
    for weight_name in (lce.WEIGHTS_NAME, WEBUI_NAME):
        y = pipe_outputs(fresh_pipe(tiny_model_dir, run_f.out, weight_name=weight_name), run_f.inputs)[0]
        d = maxdiff(y, y_trained)
        assert d <= 2e-3 * max(1.0, y_trained.abs().max().item()) and d <= 0.05 * effect, (weight_name, d, effect)


# =============================================================================
# 4. combining two LoRAs
# =============================================================================
@pytest.fixture(scope="module")
def combined(run_p, run_b, tiny_model_dir):
    ok(run_p)
    ok(run_b)
    pipe = fresh_pipe(tiny_model_dir)
    with capture_library_messages() as messages_a:
        pipe.load_lora_weights(run_p.out, adapter_name="a")
    with capture_library_messages() as messages_b:
        pipe.load_lora_weights(run_b.out, adapter_name="b")
    pipe.unet.eval()
    only_a = pipe_outputs(fresh_pipe(tiny_model_dir, run_p.out), run_p.inputs)[0]
    only_b = pipe_outputs(fresh_pipe(tiny_model_dir, run_b.out), run_p.inputs)[0]
    return SimpleNamespace(pipe=pipe, only_a=only_a, only_b=only_b, messages_a=messages_a, messages_b=messages_b)


def test_adapter_weights_one_zero_reproduce_adapter_a_alone(combined, run_p):
    assert key_complaints(combined.messages_a) == [], combined.messages_a
    # diffusers 0.42, loading a second adapter, lists the FIRST adapter's keys (".a.weight") as
    # "missing" from the second file: harmless (the outputs below prove it); nothing of "b" may be
    complaints_b = "\n".join(key_complaints(combined.messages_b))
    assert ".b.weight" not in complaints_b and "lora_A.b" not in complaints_b, complaints_b
    combined.pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 0.0])
    y = pipe_outputs(combined.pipe, run_p.inputs)[0]
    assert_close(y, combined.only_a, what="weights [1, 0] vs adapter a alone")
    assert_close(combined.only_a, run_p.outputs[0], what="adapter a alone vs run P's trained UNet")
    combined.pipe.set_adapters(["a", "b"], adapter_weights=[0.0, 1.0])
    y = pipe_outputs(combined.pipe, run_p.inputs)[0]
    assert_close(y, combined.only_b, what="weights [0, 1] vs adapter b alone")


def test_blend_is_the_weighted_sum_of_the_two_updates(combined, run_p, run_b):
    from peft.tuners.lora import LoraLayer

    from lora_tools.pictures import lora_updates

    pipe = combined.pipe
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.3])
    y = pipe_outputs(pipe, run_p.inputs)[0]
    assert maxdiff(y, combined.only_a) > 100 * tol(y) and maxdiff(y, combined.only_b) > 100 * tol(y)

    files = {"a": read_file(os.path.join(run_p.out, lce.WEIGHTS_NAME)),
             "b": read_file(os.path.join(run_b.out, lce.WEIGHTS_NAME))}
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"  # a Linear 32 -> 16
    module = pipe.unet.get_submodule(name)
    assert isinstance(module, LoraLayer) and {"a", "b"} <= set(module.lora_A)
    deltas = {}
    for adapter, (tensors, meta) in files.items():
        info = json.loads(meta["lora_adapter_metadata"])
        down, up = lora_pair(tensors, name)
        deltas[adapter] = info["unet.lora_alpha"] / info["unet.r"] * (up @ down)  # (α/r)·B·A from the file
    blend = 0.7 * deltas["a"] + 0.3 * deltas["b"]
    assert maxdiff(deltas["a"], deltas["b"]) > 1e-3  # two different adapters
    # the layer's effective update, measured on inputs: module(x) - W0·x
    x = torch.randn(5, module.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        measured = module(x) - module.get_base_layer()(x)
    assert_close(measured, x @ blend.T, rel=1e-5, what="effective update of the blended layer")
    # ... and PEFT's per-adapter updates (their scaling includes the adapter weights) sum to the blend
    total = lora_updates(pipe.unet, "a")[name] + lora_updates(pipe.unet, "b")[name]
    assert_close(total, blend, rel=1e-6, what="ΔW_a + ΔW_b from PEFT")


# =============================================================================
# 5. merge
# =============================================================================
def test_merged_pipeline_equals_base_plus_lora(run_a, loaded_a, tiny_model_dir):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    ok(run_a)
    folder = os.path.join(run_a.out, "merged_pipeline")
    assert os.path.isfile(os.path.join(folder, "model_index.json"))
    merged = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert lora_layer_names(merged.unet) == [] and lora_layer_names(merged.text_encoder) == []
    assert not any("lora" in n for n, _ in merged.unet.named_parameters())
    y_m, h_m = pipe_outputs(merged, run_a.inputs)
    y_l, h_l = pipe_outputs(loaded_a.diffusers, run_a.inputs)
    assert_close(y_m, y_l, what="merged UNet vs base + load_lora_weights")
    assert_close(h_m, h_l, what="merged text encoder vs base + load_lora_weights")
    # W = W0 + (α/r)·B·A, from the file's tensors, for one adapted layer
    tensors, _ = read_file(os.path.join(run_a.out, lce.WEIGHTS_NAME))
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    down, up = lora_pair(tensors, name)
    w0 = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").get_submodule(name).weight.detach()
    expected = w0 + (ALPHA / RANK) * (up @ down)
    w = merged.unet.get_submodule(name).weight.detach()
    assert maxdiff(expected, w0) > 1e-4
    assert maxdiff(w, expected) <= 1e-6, maxdiff(w, expected)


# =============================================================================
# 6. variants
# =============================================================================
def test_dora_trains_fp32_magnitudes_and_reloads(run_d, tiny_model_dir):
    ok(run_d)
    unet = run_d.unet
    magnitudes = {n: p for n, p in unet.named_parameters() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == len(lora_layer_names(unet)) > 0
    for n, p in magnitudes.items():
        assert p.requires_grad and p.dtype == torch.float32, n
        assert not torch.equal(p.detach(), run_d.unet_initial[n]), f"{n} did not train"
    # in the optimizer, in the learning-rate group of the A matrices (not LoRA+'s B group)
    groups = run_d.optimizer.param_groups
    in_group = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
    assert all(id(p) in in_group for p in magnitudes.values())
    a_groups = {in_group[id(p)] for n, p in unet.named_parameters() if ".lora_A." in n}
    assert {in_group[id(p)] for p in magnitudes.values()} == a_groups
    # the diffusers file reloads to the same UNet
    tensors, meta = read_file(os.path.join(run_d.out, lce.WEIGHTS_NAME))
    assert any("magnitude" in k or "dora_scale" in k for k in tensors)
    assert json.loads(meta["lora_adapter_metadata"])["unet.use_dora"] is True
    y = pipe_outputs(fresh_pipe(tiny_model_dir, run_d.out), run_d.inputs)[0]
    assert_close(y, run_d.outputs[0], what="DoRA reload")
    # no WebUI file, no spectrum, and the notes say why
    assert not os.path.exists(os.path.join(run_d.out, WEBUI_NAME))
    assert not os.path.exists(os.path.join(run_d.out, "rank_spectrum.png"))
    assert "note: USE_DORA=True — no WebUI/ComfyUI file written" in run_d.log
    assert "note: USE_DORA=True — no rank spectrum" in run_d.log


def test_rslora_scales_by_alpha_over_sqrt_r_and_both_files_reload(run_r, tiny_model_dir):
    ok(run_r)
    expected_scale = ALPHA / math.sqrt(RANK)  # 4, not α/r = 2
    scales = {m.scaling[a] for m in run_r.unet.modules() if hasattr(m, "scaling") for a in m.scaling}
    assert scales == {expected_scale}
    for weight_name in (lce.WEIGHTS_NAME, WEBUI_NAME):
        pipe = fresh_pipe(tiny_model_dir, run_r.out, weight_name=weight_name)
        y = pipe_outputs(pipe, run_r.inputs)[0]
        assert_close(y, run_r.outputs[0], what=f"rsLoRA reload of {weight_name}")
    kohya, _ = read_file(os.path.join(run_r.out, WEBUI_NAME))
    alphas = {k: v.item() for k, v in kohya.items() if k.endswith(".alpha")}
    assert alphas and set(alphas.values()) == {ALPHA * math.sqrt(RANK)}
    assert maxdiff(run_r.outputs[0], run_r.base_unet_output) > 1e-3


def test_loraplus_param_groups_by_identity(make_cfg, load_tiny):
    cfg = make_cfg("--LORAPLUS_LR_RATIO=16", "--LEARNING_RATE=1e-4")
    _, _, _, unet, _ = load_tiny(cfg)
    lce.add_lora(unet, cfg)
    named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    a = [p for n, p in named if ".lora_A." in n]
    b = [p for n, p in named if ".lora_B." in n]
    assert len(a) == len(b) and len(a) + len(b) == len(named)
    groups = lce.lora_param_groups(cfg, unet)
    assert len(groups) == 2
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in a] and groups[0]["lr"] == 1e-4
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in b] and groups[1]["lr"] == pytest.approx(1.6e-3, rel=1e-12)
    opt = lce.make_optimizer(groups, cfg, False)
    assert [g["lr"] for g in opt.param_groups] == [groups[0]["lr"], groups[1]["lr"]]
    # without LoRA+, B learns at the same rate
    plain = lce.lora_param_groups(make_cfg("--LEARNING_RATE=1e-4"), unet)
    assert [g["lr"] for g in plain] == [1e-4, 1e-4]


def test_loraplus_with_text_encoder_uses_its_own_rate(make_cfg, load_tiny):
    cfg = make_cfg("--LORAPLUS_LR_RATIO=16", "--LEARNING_RATE=1e-4", "--TRAIN_TEXT_ENCODER=True",
                   "--TEXT_ENCODER_LEARNING_RATE=2e-5")
    _, te, _, unet, _ = load_tiny(cfg)
    lce.add_lora(unet, cfg)
    lce.add_text_encoder_lora(te, cfg)
    groups = lce.lora_param_groups(cfg, unet, te)

    def ab(model):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [id(p) for n, p in named if ".lora_A." in n], [id(p) for n, p in named if ".lora_B." in n]

    (ua, ub), (ta, tb) = ab(unet), ab(te)
    assert [[id(p) for p in g["params"]] for g in groups] == [ua, ub, ta, tb]
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1.6e-3, 2e-5, 3.2e-4], rel=1e-12)
    # TEXT_ENCODER_LEARNING_RATE=None: the text encoder learns at LEARNING_RATE
    cfg2 = make_cfg("--LEARNING_RATE=1e-4", "--TRAIN_TEXT_ENCODER=True")
    assert [g["lr"] for g in lce.lora_param_groups(cfg2, unet, te)] == pytest.approx([1e-4] * 4, rel=1e-12)


def test_run_optimizer_groups_follow_the_scheduler(run_a):
    ok(run_a)
    base = [A_LR, A_LR * A_RATIO, A_TE_LR, A_TE_LR * A_RATIO]  # unet A, unet B, text encoder A, B
    assert [g["lr"] for g in run_a.groups_given] == pytest.approx(base, rel=1e-12)
    assert [g["initial_lr"] for g in run_a.optimizer.param_groups] == pytest.approx(base, rel=1e-12)
    assert len(run_a.step_lrs) == A_STEPS  # one optimizer step per clip call
    for step, lrs in enumerate(run_a.step_lrs):  # the lr used at optimizer step step+1
        factor = cosine_with_warmup(step, A_WARMUP, A_STEPS)
        assert lrs == pytest.approx([b * factor for b in base], rel=1e-9, abs=1e-15), step
    assert len({lrs[0] for lrs in run_a.step_lrs}) > 3  # the schedule really moved
    final = [g["lr"] for g in run_a.optimizer.param_groups]
    factor = cosine_with_warmup(A_STEPS, A_WARMUP, A_STEPS)
    assert final == pytest.approx([b * factor for b in base], rel=1e-9, abs=1e-15)


@pytest.fixture
def schedulers(tiny_model_dir):
    from diffusers import DDPMScheduler

    eps = DDPMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler")
    assert eps.config.prediction_type == "epsilon"
    v = DDPMScheduler.from_config(eps.config, prediction_type="v_prediction")
    return eps, v


def test_min_snr_weights_match_the_formula(schedulers):
    eps, v = schedulers
    gamma = 5.0
    t = torch.tensor([0, 5, 20, 50, 100, 200, 400, 700, 999])
    ac = eps.alphas_cumprod.double()[t]
    snr = ac / (1 - ac)
    assert (snr > gamma).any() and (snr < gamma).any()
    clipped = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))
    w_eps = lce.min_snr_weights(eps, t, gamma)
    w_v = lce.min_snr_weights(v, t, gamma)
    assert w_eps.shape == w_v.shape == t.shape
    assert torch.allclose(w_eps.double(), clipped / snr, rtol=1e-5, atol=0)
    assert torch.allclose(w_v.double(), clipped / (snr + 1), rtol=1e-5, atol=0)
    # where SNR < γ an ε-prediction loss is unweighted
    assert torch.allclose(w_eps[snr < gamma].double(), torch.ones(int((snr < gamma).sum()), dtype=torch.float64))


def test_compute_loss_with_snr_gamma_is_the_weighted_per_image_mse(make_cfg, load_tiny, schedulers):
    eps, _ = schedulers
    cfg = make_cfg()
    _, _, _, unet, _ = load_tiny(cfg)
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
        # by hand, the same random draws in the same order: z0, ε, t
        torch.manual_seed(seed)
        latents = (batch["latent_mean"] + batch["latent_std"] * torch.randn(B, 4, 8, 8)) * sf
        noise = torch.randn(B, 4, 8, 8)
        t = torch.randint(0, 1000, (B,))
        ac = eps.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        noisy = (ac.sqrt() * latents.double() + (1 - ac).sqrt() * noise.double()).float()
        pred = unet(noisy, t, batch["text_emb"], return_dict=False)[0]
    per_image = ((pred.double() - noise.double()) ** 2).mean(dim=(1, 2, 3))
    snr = ac.view(-1) / (1 - ac.view(-1))
    weights = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / snr
    assert (weights < 0.999).any() and (weights == 1).any(), (t, snr)  # both regimes in this batch
    expected = (per_image * weights).mean().item()
    assert loss == pytest.approx(expected, rel=1e-4)
    assert plain == pytest.approx(per_image.mean().item(), rel=1e-4)
    assert abs(loss - plain) > 1e-3 * plain  # the weighting did something


class AddNoiseSpy:
    """The scheduler, with add_noise recording the noise compute_loss draws."""

    def __init__(self, scheduler):
        self.scheduler, self.config, self.noises = scheduler, scheduler.config, []
        self.alphas_cumprod = scheduler.alphas_cumprod

    def add_noise(self, latents, noise, t):
        self.noises.append(noise.detach().clone())
        return self.scheduler.add_noise(latents, noise, t)

    def get_velocity(self, *args):
        return self.scheduler.get_velocity(*args)


def zero_unet(noisy, t, emb, return_dict=False):
    return (torch.zeros_like(noisy),)


@pytest.mark.parametrize("offset", [0.5, 0.0])
def test_noise_offset_adds_one_shift_per_image_and_channel(schedulers, offset):
    eps, _ = schedulers
    B, C, S = 256, 4, 16
    batch = {"latent_mean": torch.zeros(B, C, S, S), "latent_std": torch.ones(B, C, S, S), "text_emb": torch.zeros(B, 77, 8)}
    spy = AddNoiseSpy(eps)
    torch.manual_seed(123)
    loss = lce.compute_loss(batch, zero_unet, spy, 0.18215, noise_offset=offset)
    (noise,) = spy.noises
    # exactly randn + offset·randn(B, C, 1, 1), drawn after z0's randn
    torch.manual_seed(123)
    torch.randn(B, C, S, S)
    expected = torch.randn(B, C, S, S)
    if offset:
        expected = expected + offset * torch.randn(B, C, 1, 1)
    assert torch.equal(noise, expected)
    # the target is that noise: the loss of a zero prediction is its mean square
    assert loss.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)
    # statistics: the per-(image, channel) mean of the noise has std ≈ offset (plus 1/S from the randn)
    means = noise.mean(dim=(2, 3))
    std = means.std().item()
    if offset:
        assert abs(std - offset) <= 0.2 * offset, std
    else:
        assert std < 0.1, std  # ≈ 1/S = 0.0625: no shared shift


# =============================================================================
# 7. pictures
# =============================================================================
def test_validation_grid_layout_and_content(run_a, tiny_model_dir):
    from lora_tools.pictures import image_grid

    ok(run_a)
    cfg = run_a.cfg
    path = os.path.join(run_a.out, "validation", "step-000005.png")
    assert sorted(os.listdir(os.path.join(run_a.out, "validation"))) == ["step-000005.png"]  # not at the last step
    seeds = [cfg.SEED + i for i in range(cfg.NUM_VALIDATION_SEEDS)]
    prompts = list(cfg.VALIDATION_PROMPTS)
    blank = [Image.new("RGB", (cfg.RESOLUTION, cfg.RESOLUTION))] * (len(prompts) * len(seeds))
    layout = image_grid(blank, rows=len(prompts), labels=[f"seed {s}" for s in seeds], row_labels=prompts)
    written = png(path)
    assert (written.shape[1], written.shape[0]) == layout.size
    # its cells are the model at step 5 (= checkpoint-5, UNet and text encoder) rendered by plain diffusers
    pipe = fresh_pipe(tiny_model_dir, os.path.join(run_a.out, "checkpoint-5"))
    renders = [render(pipe, p, s, cfg) for p in prompts for s in seeds]
    expected = pil_array(image_grid(renders, rows=len(prompts), labels=[f"seed {s}" for s in seeds], row_labels=prompts))
    assert np.abs(written - expected).max() <= 1


def test_comparison_image_rows_are_base_and_base_plus_lora(run_a, loaded_a):
    from lora_tools.pictures import comparison_image

    cfg = run_a.cfg
    prompts = list(cfg.VALIDATION_PROMPTS)
    base = [render(loaded_a.base, p, cfg.SEED, cfg) for p in prompts]
    tuned = [render(loaded_a.diffusers, p, cfg.SEED, cfg) for p in prompts]
    assert any(np.abs(pil_array(b) - pil_array(t)).max() > 10 for b, t in zip(base, tuned))  # the rows differ
    expected = pil_array(comparison_image(base, tuned, prompts))
    written = png(os.path.join(run_a.out, "comparison.png"))
    assert written.shape == expected.shape
    assert np.abs(written - expected).max() <= 1


def test_metrics_and_loss_curve(run_a, tmp_path):
    from lora_tools.pictures import read_metrics, save_loss_curve

    ok(run_a)
    with open(os.path.join(run_a.out, "metrics.jsonl")) as f:
        lines = f.read().splitlines()
    assert len(lines) == A_STEPS
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(1, A_STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    for r in records:  # the lr used by step s: the schedule after s - 1 scheduler steps
        assert r["lr"] == pytest.approx(A_LR * cosine_with_warmup(r["step"] - 1, A_WARMUP, A_STEPS), rel=1e-9, abs=1e-15)
    # loss_curve.png is the picture of exactly these records
    again = str(tmp_path / "loss.png")
    save_loss_curve(read_metrics(os.path.join(run_a.out, "metrics.jsonl")), again)
    assert np.array_equal(png(os.path.join(run_a.out, "loss_curve.png")), png(again))


def test_metrics_epoch_is_the_epoch_of_each_step(run_a):
    """Each metrics.jsonl line's "epoch" is the epoch its step trained in (8 images / batch 4 = 2
    steps an epoch), not the epoch in which the line happened to be flushed (LOG_EVERY=5)."""
    ok(run_a)
    with open(os.path.join(run_a.out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [(r["step"], r["epoch"]) for r in records] == [(s, (s - 1) // 2) for s in range(1, A_STEPS + 1)]


# =============================================================================
# 10. rank spectrum (and the rank_spectrum.png of item 7)
# =============================================================================
def expected_groups(unet):
    """Block + attention kind of every adapted UNet layer, worked out from the names alone."""
    groups = {}
    for name in lora_layer_names(unet):
        parts = name.split(".")
        block = "mid_block" if parts[0] == "mid_block" else f"{parts[0]}.{parts[1]}"
        kind = next(p for p in parts if p in ("attn1", "attn2"))
        groups[f"{block} {kind}"] = groups.get(f"{block} {kind}", 0) + 1
    return groups


def test_rank_spectrum_table_and_plot(run_a, tmp_path):
    from lora_tools.pictures import save_spectrum_plot

    ok(run_a)
    assert run_a.spectrum_unet is run_a.unet  # the trained UNet
    text, rows = run_a.expected_text, run_a.expected_rows
    assert text in run_a.log  # printed
    table = text.splitlines()
    assert set(table[2]) == {"-"}  # title, header, rule, then one row per group
    body = table[3:]
    groups = expected_groups(run_a.unet)
    assert len(body) == len(rows) == len(groups) == 14  # down 0-2, mid, up 1-3; attn1 and attn2 each
    order = sorted(groups, key=lambda g: ({"down": 0, "mid": 1, "up": 2}[g[:g.index("_")]],
                                          int(g.split(" ")[0].split(".")[1]) if "." in g else 0, g))
    assert [r["group"] for r in rows] == order
    for line, r in zip(body, rows):
        cells = line.split()
        assert " ".join(cells[:2]) == r["group"] and int(cells[2]) == groups[r["group"]] == r["matrices"]
    again = str(tmp_path / "spectrum.png")
    save_spectrum_plot(rows, again)
    assert np.array_equal(png(os.path.join(run_a.out, "rank_spectrum.png")), png(again))


# =============================================================================
# 8. TensorBoard
# =============================================================================
def test_tensorboard_logs_loss_and_lr_every_step(tmp_path, tiny_model_dir, tiny_data_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path / "out")
    rec = ok(run(base_argv(tiny_model_dir, tiny_data_dir, out, "--MAX_TRAIN_STEPS=3", "--REPORT_TO=tensorboard",
                           "--LOG_EVERY=2"), out))
    event_dirs = sorted({root for root, _, files in os.walk(os.path.join(out, "logs"))
                         for f in files if f.startswith("events.out.tfevents")})
    accumulators = []
    for d in event_dirs:  # accelerate writes the scalars in logs/lora and the hparams in a subfolder
        acc = EventAccumulator(d)
        acc.Reload()
        if "loss" in acc.Tags()["scalars"]:
            accumulators.append(acc)
    assert len(accumulators) == 1, event_dirs
    acc = accumulators[0]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    for tag in ("loss", "lr"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3]
        assert [e.value for e in events] == pytest.approx([r[tag] for r in records], rel=1e-6)
    assert rec.cfg.REPORT_TO == "tensorboard"


def test_tensorboard_missing_fails_fast_naming_pip_install(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard."):
            return None
        return real_find_spec(name, *args, **kwargs)

    def no_loading(*args, **kwargs):
        raise AssertionError("load_models was called: the missing package was not caught before the slow work")

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(lce, "load_models", no_loading)
    out = str(tmp_path / "out")
    try:
        with pytest.raises(UserError) as e:
            lce.main(base_argv(tiny_model_dir, tiny_data_dir, out, "--MAX_TRAIN_STEPS=3", "--REPORT_TO=tensorboard"))
    finally:
        reset_accelerate()
    message = str(e.value)
    assert "pip install tensorboard" in message and "REPORT_TO" in message and "\n" not in message
    assert not os.path.exists(os.path.join(out, lce.WEIGHTS_NAME))


# =============================================================================
# 9. several processes
# =============================================================================
def test_two_processes_share_the_data_and_write_one_file(multi_process):
    try:
        rc = multi_process.proc.wait(timeout=400)
    except subprocess.TimeoutExpired:
        multi_process.proc.kill()
        multi_process.proc.wait()
        rc = "timeout"
    with open(multi_process.log) as f, open(multi_process.err) as e:
        log, err = f.read(), e.read()
    assert rc == 0, f"{' '.join(multi_process.cmd)} -> {rc}\n{log[-3000:]}\n{err[-3000:]}"
    written = [os.path.relpath(os.path.join(root, n), multi_process.out) for root, _, files in os.walk(multi_process.out)
               for n in files if n.endswith(".safetensors")]
    assert sorted(written) == sorted([lce.WEIGHTS_NAME, WEBUI_NAME]), written
    batch = lce.demo_settings["BATCH_SIZE"]
    accumulation = lce.demo_settings["GRADIENT_ACCUMULATION_STEPS"]
    assert f"effective batch {batch * accumulation * 2} = {batch} x {accumulation} accumulation x 2 process(es)" in log
    reports = dict(re.findall(r"process (\d)/2: \d+ batches, first images \[([\d, ]*)\]", log))
    assert sorted(reports) == ["0", "1"], log[-4000:]
    first = {k: [int(i) for i in v.split(",")][:batch] for k, v in reports.items()}
    assert len(first["0"]) == len(first["1"]) == batch
    assert set(first["0"]).isdisjoint(first["1"]), first
    assert set(first["0"]) | set(first["1"]) == set(range(8))  # the demo's 8 images, each seen once in epoch 0
    # the one file holds the trained adapter
    tensors, meta = read_file(os.path.join(multi_process.out, lce.WEIGHTS_NAME))
    assert tensors and all(k.startswith("unet.") for k in tensors)
    assert any(torch.count_nonzero(v) for k, v in tensors.items() if "up" in k or "lora_B" in k)
