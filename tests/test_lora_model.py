"""LoRA on the models (section 4) and the optimizer over it (section 6): a fresh adapter is exactly the
base model, parameter counts (the tiny UNet and SD1.5's on the meta device), fp32 adapters over a
bf16 model, the LoRA+ / text-encoder / DoRA parameter groups, and the script's own checks of what
it saves (the reload check, refusing NaN weights)."""
import os
import re
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_complete_example as lce
from conftest import collate_items, outputs, read_safetensors, total_grad_norm
from lora_tools.config import UserError


def targeted_linears(model, targets):
    """Independent of PEFT: the Linear layers whose name is, or ends with '.' + , a target."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)}


def unet_lora(cfg, load_tiny, dtype=torch.float32):
    sd = load_tiny(cfg, dtype)
    return sd, lce.add_lora(sd.unet, cfg, cfg.TARGET_MODULES)


def set_b(model, std=0.05, seed=1):
    """A trained-looking adapter: B != 0 (it starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(std * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- B = 0: the base model
@pytest.mark.parametrize("extra", [[], ["--LORA_RANK=8", "--LORA_ALPHA=32", "--TARGET_MODULES=to_k,to_v"]])
def test_fresh_lora_gives_exactly_the_base_output_for_unet_and_text_encoder(make_cfg, load_tiny, extra):
    cfg = make_cfg(*extra)
    sd = load_tiny(cfg)
    unet, te = sd.unet, sd.text_encoders[0]
    y_base, h_base = outputs(unet, te)
    for model, targets, setting in ((unet, cfg.TARGET_MODULES, "TARGET_MODULES"),
                                    (te, cfg.TEXT_ENCODER_TARGET_MODULES, "TEXT_ENCODER_TARGET_MODULES")):
        n_targets = len(targeted_linears(model, targets))
        params = lce.add_lora(model, cfg, targets, setting)
        b = [p for n, p in model.named_parameters() if ".lora_B." in n]
        assert len(b) == n_targets > 0 and len(params) == 2 * len(b)
        assert all(torch.count_nonzero(p) == 0 for p in b)
    y, h = outputs(unet, te)
    assert torch.equal(y, y_base) and torch.equal(h, h_base)
    set_b(unet)  # non-vacuous: the adapters are in the forward path
    set_b(te)
    y, h = outputs(unet, te)
    assert not torch.equal(y, y_base) and not torch.equal(h, h_base)


def test_add_lora_counts_on_the_tiny_unet(make_cfg, load_tiny):
    cfg = make_cfg("--LORA_RANK=3")
    unet = load_tiny(cfg).unet
    base = lce.count_params(unet)
    expected = sum(3 * (m.in_features + m.out_features) for m in targeted_linears(unet, cfg.TARGET_MODULES).values())
    params = lce.add_lora(unet, cfg, cfg.TARGET_MODULES)
    assert sum(p.numel() for p in params) == lce.count_params(unet, trainable=True) == expected
    assert lce.count_params(unet, trainable=False) == base


def test_unknown_target_module_is_a_user_error_listing_the_attention_projections(make_cfg, load_tiny):
    cfg = make_cfg("--TARGET_MODULES=to_q,to_x")
    sd = load_tiny(cfg)
    unet, te = sd.unet, sd.text_encoders[0]
    with pytest.raises(UserError) as e:
        lce.add_lora(unet, cfg, cfg.TARGET_MODULES)
    message = str(e.value)
    assert "to_x" in message and "--TARGET_MODULES=" in message and "\n" not in message
    assert all(f"'{p}'" in message for p in ("to_q", "to_k", "to_v", "to_out.0")), message
    with pytest.raises(UserError, match=r"TEXT_ENCODER_TARGET_MODULES.*'q_proj'"):
        lce.add_lora(te, cfg, ["q_proj", "to_q"], "TEXT_ENCODER_TARGET_MODULES")
    assert not any(p.requires_grad for p in unet.parameters())  # refused before any adapter was added


@pytest.mark.parametrize("rank, expected", [(4, 797_184), (8, 1_594_368)])
def test_sd15_lora_trainable_count_on_a_meta_unet(rank, expected):
    from lora_tools.sd15 import SD15_UNET_PARAMS, sd15_unet

    unet = sd15_unet("meta")
    assert next(unet.parameters()).device.type == "meta"
    assert lce.count_params(unet) == SD15_UNET_PARAMS == 859_520_964
    lce.freeze(unet)
    cfg = lce.resolve_config([f"--LORA_RANK={rank}", f"--LORA_ALPHA={rank}", "--TARGET_MODULES=to_q,to_k,to_v,to_out.0"])
    params = lce.add_lora(unet, cfg, cfg.TARGET_MODULES)
    assert sum(p.numel() for p in params) == lce.count_params(unet, trainable=True) == expected
    assert lce.count_params(unet, trainable=False) == 859_520_964
    assert all(p.dtype == torch.float32 for p in params)
    assert len(params) == 16 * 2 * 4 * 2  # 16 transformer blocks x (attn1 + attn2) x 4 projections, each an A and a B


# ----------------------------------------------------------------------------- fp32 LoRA under bf16
def test_lora_is_fp32_over_a_bf16_model_and_one_bf16_autocast_step_keeps_it(make_cfg, load_tiny):
    from accelerate import Accelerator

    cfg = make_cfg()
    sd, params = unet_lora(cfg, load_tiny, torch.bfloat16)
    unet, te, vae = sd.unet, sd.text_encoders[0], sd.vae
    names = {id(p): n for n, p in unet.named_parameters()}
    for n, p in unet.named_parameters():
        assert (p.dtype == torch.float32 and ".lora_" in n) if p.requires_grad else (p.dtype == torch.bfloat16 and ".lora_" not in n), n
    assert all(p.dtype == torch.bfloat16 for m in (te, vae) for p in m.parameters())
    assert sorted(map(id, params)) == sorted(id(p) for p in unet.parameters() if p.requires_grad)

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    optimizer = lce.make_optimizer(lce.lora_param_groups([(unet, 1e-3)], cfg), cfg, cuda=False)
    seen = []
    lora_module = next(m for n, m in unet.named_modules() if n.endswith("lora_A.default"))
    hook = lora_module.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    images, captions = lce.load_captioned_images(cfg, show_progress=False)
    ds = lce.CaptionedImages(images, lce.tokenize(sd.tokenizers, captions), cfg)
    before = [p.detach().clone() for p in params]
    with accelerator.autocast():
        loss = lce.compute_loss(collate_items(ds, [(0, False, 1), (1, False, 2)]), sd).mean()
    hook.remove()
    assert seen == [torch.bfloat16]  # the step really ran under bf16 autocast
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    accelerator.backward(loss)
    for p in params:
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), names[id(p)]
    assert total_grad_norm(params) > 0 and all(p.grad is None for p in unet.parameters() if not p.requires_grad)
    optimizer.step()
    assert all(p.dtype == torch.float32 for p in params)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))


# ----------------------------------------------------------------------------- the optimizer
def ids(model, kind):
    return [id(p) for n, p in model.named_parameters() if p.requires_grad and kind in n]


def test_loraplus_groups_by_identity_and_the_text_encoder_rate(make_cfg, load_tiny):
    cfg = make_cfg("--LORAPLUS_LR_RATIO=16", "--LEARNING_RATE=1e-4")
    sd = load_tiny(cfg)
    unet, te = sd.unet, sd.text_encoders[0]
    lce.add_lora(unet, cfg, cfg.TARGET_MODULES)
    lce.add_lora(te, cfg, cfg.TEXT_ENCODER_TARGET_MODULES, "TEXT_ENCODER_TARGET_MODULES")
    opt = lce.make_optimizer(lce.lora_param_groups([(unet, 1e-4), (te, 2e-5)], cfg), cfg, cuda=False)
    groups = [[id(p) for p in g["params"]] for g in opt.param_groups]
    assert groups == [ids(unet, ".lora_A."), ids(unet, ".lora_B."), ids(te, ".lora_A."), ids(te, ".lora_B.")]
    assert sum(map(len, groups)) == sum(p.requires_grad for m in (unet, te) for p in m.parameters())
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 1.6e-3, 2e-5, 3.2e-4], rel=1e-12)
    # without LoRA+, B learns at the rate of A
    plain_cfg = make_cfg("--LEARNING_RATE=1e-4")
    plain = lce.make_optimizer(lce.lora_param_groups([(unet, 1e-4), (te, 1e-4)], plain_cfg), plain_cfg, cuda=False)
    assert [g["lr"] for g in plain.param_groups] == [1e-4] * 4


def test_dora_magnitudes_are_fp32_and_learn_in_the_group_of_a(make_cfg, load_tiny):
    cfg = make_cfg("--USE_DORA=True", "--LORAPLUS_LR_RATIO=16")
    unet = load_tiny(cfg, torch.bfloat16).unet
    n_targets = len(targeted_linears(unet, cfg.TARGET_MODULES))
    lce.add_lora(unet, cfg, cfg.TARGET_MODULES)
    magnitudes = {n: p for n, p in unet.named_parameters() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == n_targets > 0
    assert all(p.requires_grad and p.dtype == torch.float32 for p in magnitudes.values())
    a_group = lce.make_optimizer(lce.lora_param_groups([(unet, 1e-4)], cfg), cfg, cuda=False).param_groups[0]
    assert {id(p) for p in magnitudes.values()} <= {id(p) for p in a_group["params"]} and a_group["lr"] == 1e-4


def test_default_optimizer_is_multi_tensor_adamw_with_the_configured_settings():
    cfg = lce.resolve_config(["--LEARNING_RATE=2e-4", "--ADAM_WEIGHT_DECAY=0.0"])
    opt = lce.make_optimizer([{"params": list(torch.nn.Linear(2, 2).parameters()), "lr": 2e-4}], cfg, cuda=False)
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["lr"] == 2e-4 and opt.defaults["weight_decay"] == 0.0 and opt.defaults["foreach"] is True


def test_8bit_adam_is_bitsandbytes_adamw8bit_with_our_settings(monkeypatch):
    made = {}
    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=lambda params, lr, weight_decay: made.update(params=params, lr=lr, wd=weight_decay) or "8bit")
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    cfg = lce.resolve_config(["--USE_8BIT_ADAM=True", "--LEARNING_RATE=3e-4", "--ADAM_WEIGHT_DECAY=0.05"])
    layer = torch.nn.Linear(2, 2)
    groups = [{"params": list(layer.parameters()), "lr": 3e-4}]
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        lce.make_optimizer(groups, cfg, cuda=False)
    assert lce.make_optimizer(groups, cfg, cuda=True) == "8bit"
    assert made["lr"] == 3e-4 and made["wd"] == 0.05 and [p for g in made["params"] for p in g["params"]] == list(layer.parameters())


# ----------------------------------------------------------------------------- what the script saves
@pytest.mark.parametrize("alpha", [4, 8])
def test_reload_check_passes_a_correct_file_and_catches_a_wrong_one(make_cfg, load_tiny, tmp_path, capsys, alpha):
    """check_saved_lora (main runs it after saving) must pass a file save_lora just wrote, also when
    LORA_ALPHA != LORA_RANK (the reload must read alpha from the metadata), and stop on a wrong file."""
    from contextlib import nullcontext

    cfg = make_cfg("--LORA_RANK=4", f"--LORA_ALPHA={alpha}")
    unet = unet_lora(cfg, load_tiny)[0].unet
    set_b(unet)
    path = str(tmp_path / lce.WEIGHTS_NAME)
    lce.save_lora(path, {"unet": unet}, cfg)
    lce.check_saved_lora(unet, path, cfg, 8, nullcontext)
    m = re.search(r"^reload check: .* = (\S+) \(LoRA's own effect (\S+)\)$", capsys.readouterr().out, re.M)
    assert m and float(m.group(1)) <= 1e-5 < 1e-2 < float(m.group(2)), m
    tensors, meta = read_safetensors(path)
    save_file({k: v * 0.5 if ".up." in k or "lora_B" in k else v for k, v in tensors.items()}, path, metadata=meta)  # B halved
    with pytest.raises(RuntimeError, match="does not reproduce the trained model"):
        lce.check_saved_lora(unet, path, cfg, 8, nullcontext)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_save_lora_refuses_non_finite_weights_and_keeps_the_old_file(make_cfg, load_tiny, tmp_path, bad):
    cfg = make_cfg()
    unet = unet_lora(cfg, load_tiny)[0].unet
    path = str(tmp_path / lce.WEIGHTS_NAME)
    lce.save_lora(path, {"unet": unet}, cfg)  # a good file first
    good = load_file(path)
    with torch.no_grad():
        next(p for n, p in unet.named_parameters() if "lora_B" in n).view(-1)[0] = bad
    with pytest.raises(UserError, match="LEARNING_RATE") as e:
        lce.save_lora(path, {"unet": unet}, cfg)
    assert "\n" not in str(e.value)
    assert load_file(path).keys() == good.keys() and all(torch.equal(load_file(path)[k], v) for k, v in good.items())
    assert os.listdir(tmp_path) == [lce.WEIGHTS_NAME]  # no temporary file left behind

