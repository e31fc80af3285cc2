"""The speed/memory knobs (GRADIENT_CHECKPOINTING, VAE_FP32, COMPILE, USE_8BIT_ADAM), the CPU
host-memory policy, and compare_runs.py (the rank-comparison sheet)."""
import json
import os
import sys
import types

import pytest
import torch
from PIL import Image

import lora_complete_example as lce
from lora_tools.config import UserError
from lora_tools.demo import build_tiny_components

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import compare_runs  # noqa: E402


def run_main(tiny_model_dir, tiny_data_dir, out, *extra):
    args = [f"--MODEL_ID={tiny_model_dir}", f"--DATA_DIR={tiny_data_dir}", f"--OUTPUT_DIR={out}", "--RESOLUTION=64",
            "--BATCH_SIZE=4", "--GRADIENT_ACCUMULATION_STEPS=1", "--MAX_TRAIN_STEPS=2", "--NUM_INFERENCE_STEPS=2",
            "--NUM_VALIDATION_SEEDS=1", "--CHECKPOINTING_STEPS=None", *extra]
    lce.main(args)


# ----------------------------------------------------------------------------- gradient checkpointing
def unet_with_trained_looking_lora(seed=0):
    torch.manual_seed(seed)
    unet = build_tiny_components()["unet"]
    lce.freeze(unet)
    params = lce.add_lora(unet, lce.resolve_config(["--RESOLUTION=64"]))
    with torch.no_grad():  # B != 0, so that A gets gradients too
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    unet.train()
    return unet, params


def grads_and_checkpoint_calls(checkpointing, monkeypatch):
    import torch.utils.checkpoint as tuc

    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))  # read when enabled
    unet, params = unet_with_trained_looking_lora()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(1)
    z, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    loss = unet(z, torch.tensor([10, 500]), c).sample.square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params], len(calls)


def test_gradient_checkpointing_is_used_and_gives_the_same_gradients(monkeypatch):
    loss0, grads0, calls0 = grads_and_checkpoint_calls(False, monkeypatch)
    loss1, grads1, calls1 = grads_and_checkpoint_calls(True, monkeypatch)
    assert calls0 == 0 and calls1 > 0  # blocks ran through torch.utils.checkpoint: activations recomputed
    assert torch.equal(loss0, loss1)
    for a, b in zip(grads0, grads1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- main() wiring of the knobs
@pytest.fixture(scope="module")
def knob_run(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    """One bf16 run with GRADIENT_CHECKPOINTING, VAE_FP32 and COMPILE, recording what main() did."""
    from diffusers import UNet2DConditionModel

    seen = {"checkpointing": 0, "compiled": [], "vae_dtype": None, "unet_dtypes": None}
    real_enable = UNet2DConditionModel.enable_gradient_checkpointing
    real_compile, real_cache = torch.compile, lce.cache_latents

    def enable_spy(self, *a, **k):
        seen["checkpointing"] += 1
        return real_enable(self, *a, **k)

    def compile_spy(model, *a, **k):
        seen["compiled"].append(type(model).__name__)
        return real_compile(model, backend="eager")  # the real dynamo path, without a C++ build

    def cache_spy(dataset, vae, text_encoder, cfg, show_progress=True):
        seen["vae_dtype"] = vae.dtype
        return real_cache(dataset, vae, text_encoder, cfg, show_progress)

    out = str(tmp_path_factory.mktemp("knobs") / "out")
    mp = pytest.MonkeyPatch()
    mp.setattr(UNet2DConditionModel, "enable_gradient_checkpointing", enable_spy)
    mp.setattr(torch, "compile", compile_spy)
    mp.setattr(lce, "cache_latents", cache_spy)
    real_add = lce.add_lora

    def add_spy(unet, cfg):
        params = real_add(unet, cfg)
        seen["unet_dtypes"] = ({p.dtype for p in unet.parameters() if not p.requires_grad}, {p.dtype for p in params})
        return params

    mp.setattr(lce, "add_lora", add_spy)
    try:
        run_main(tiny_model_dir, tiny_data_dir, out, "--MIXED_PRECISION=bf16", "--VAE_FP32=True",
                 "--GRADIENT_CHECKPOINTING=True", "--COMPILE=True")
    finally:
        mp.undo()
    return out, seen


def test_knobs_reach_the_models(knob_run):
    out, seen = knob_run
    assert seen["checkpointing"] == 1
    assert seen["compiled"] == ["UNet2DConditionModel"]
    assert seen["vae_dtype"] == torch.float32  # VAE_FP32 under bf16
    assert seen["unet_dtypes"] == ({torch.bfloat16}, {torch.float32})  # frozen bf16, LoRA fp32


def test_knob_run_saves_a_file_that_reloads(knob_run):
    from safetensors.torch import load_file

    out, _ = knob_run
    tensors = load_file(os.path.join(out, lce.WEIGHTS_NAME))
    assert tensors and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    assert os.path.isfile(os.path.join(out, "test_generation.png"))  # the run got past the reload check


# ----------------------------------------------------------------------------- 8-bit AdamW
def test_8bit_adam_without_bitsandbytes_fails_fast(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        lce.check_environment(lce.resolve_config(["--USE_8BIT_ADAM=True"]))


def test_8bit_adam_is_bitsandbytes_adamw8bit_with_our_settings(monkeypatch):
    made = {}

    class FakeAdamW8bit:
        def __init__(self, params, lr, weight_decay):
            made.update(params=params, lr=lr, weight_decay=weight_decay)

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=FakeAdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    cfg = lce.resolve_config(["--USE_8BIT_ADAM=True", "--LEARNING_RATE=3e-4", "--ADAM_WEIGHT_DECAY=0.05"])
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        lce.make_optimizer(params, cfg, cuda=False)
    opt = lce.make_optimizer(params, cfg, cuda=True)
    assert isinstance(opt, FakeAdamW8bit) and made == dict(params=params, lr=3e-4, weight_decay=0.05)


def test_default_optimizer_is_adamw_with_the_configured_settings():
    cfg = lce.resolve_config(["--LEARNING_RATE=2e-4", "--ADAM_WEIGHT_DECAY=0.0"])
    opt = lce.make_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg, cuda=False)
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["lr"] == 2e-4 and opt.defaults["weight_decay"] == 0.0 and opt.defaults["foreach"] is True


def test_host_memory_policy_is_applied_on_linux():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    assert lce.keep_host_memory() is True


# ----------------------------------------------------------------------------- compare_runs.py
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    root = tmp_path_factory.mktemp("ranks")
    folders = []
    for rank in (2, 4):
        out = str(root / f"rank{rank}")
        run_main(tiny_model_dir, tiny_data_dir, out, f"--LORA_RANK={rank}", f"--LORA_ALPHA={rank}")
        folders.append(out)
    return folders


def test_compare_runs_stacks_one_labelled_row_per_run(two_runs, tmp_path):
    from lora_tools.pictures import image_grid

    out = str(tmp_path / "ranks.png")
    compare_runs.main([*two_runs, f"--OUT={out}"])
    images = [Image.open(os.path.join(f, "comparison.png")).convert("RGB") for f in two_runs]
    configs = [json.load(open(os.path.join(f, "training_config.json"))) for f in two_runs]
    sizes = [os.path.getsize(os.path.join(f, lce.WEIGHTS_NAME)) for f in two_runs]
    labels = compare_runs.row_labels(configs, sizes)
    assert labels[0].startswith("LORA_ALPHA=2, LORA_RANK=2") and labels[1].startswith("LORA_ALPHA=4, LORA_RANK=4")
    assert sizes[1] > sizes[0]  # rank 4 stores twice the LoRA numbers of rank 2
    expected = image_grid(images, rows=2, row_labels=labels)
    sheet = Image.open(out).convert("RGB")
    assert sheet.size == expected.size
    assert list(sheet.getdata()) == list(expected.getdata())


def test_compare_runs_refuses_what_is_not_a_run(two_runs, tmp_path):
    with pytest.raises(UserError, match="not a finished run folder"):
        compare_runs.main([two_runs[0], str(tmp_path)])
    with pytest.raises(UserError, match="at least two"):
        compare_runs.main([two_runs[0]])


# ----------------------------------------------------------------------------- attention kernel
def test_unet_attention_runs_on_pytorch_sdpa(make_cfg, load_tiny, monkeypatch):
    """Every attention layer of the loaded UNet uses PyTorch's fused scaled_dot_product_attention."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    _, _, _, unet, _ = load_tiny(make_cfg())
    processors = unet.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    z, c = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        unet(z, torch.tensor([1]), c)
    assert len(calls) == len(processors)  # one fused kernel call per attention layer
