"""Acceptance points 3, 4, 6, 7: a fresh LoRA is the base model, exact SD1.5 parameter counts,
fp32 LoRA over a bf16 model, and gradient clipping of the LoRA tensors."""
from contextlib import nullcontext

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora_complete_example as lce
from conftest import fixed_unet_inputs, loss_of, pixel_batch, total_grad_norm


def unet_out(unet, inputs):
    z, t, c = inputs
    with torch.no_grad():
        return unet(z, t, c, return_dict=False)[0]


def targeted_linears(unet, targets):
    """Independent of PEFT: the Linear layers whose name is, or ends with '.' + , a target."""
    return {n: m for n, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)}


# ----------------------------------------------------------------------------- 3. B = 0 -> base model
@pytest.mark.parametrize("extra", [[], ["--LORA_RANK=8", "--LORA_ALPHA=32", "--TARGET_MODULES=to_k,to_v"]])
def test_fresh_lora_gives_exactly_the_base_output(make_cfg, load_tiny, extra):
    cfg = make_cfg(*extra)
    unet = load_tiny(cfg)[3]
    inputs = fixed_unet_inputs(unet)
    y_base = unet_out(unet, inputs)
    n_targets = len(targeted_linears(unet, cfg.TARGET_MODULES))
    params = lce.add_lora(unet, cfg)
    b = [p for n, p in unet.named_parameters() if ".lora_B." in n]
    assert len(b) == n_targets > 0
    assert all(torch.count_nonzero(p) == 0 for p in b)
    assert torch.equal(unet_out(unet, inputs), y_base)
    # non-vacuous: the adapter is in the forward path, a non-zero B changes the output
    with torch.no_grad():
        b[0].fill_(0.05)
    assert not torch.equal(unet_out(unet, inputs), y_base)
    assert len(params) == 2 * len(b)


def test_add_lora_counts_on_the_tiny_unet(make_cfg, load_tiny):
    cfg = make_cfg("--LORA_RANK=3")
    unet = load_tiny(cfg)[3]
    base = lce.count_params(unet)
    linears = targeted_linears(unet, cfg.TARGET_MODULES)
    expected = sum(3 * (m.in_features + m.out_features) for m in linears.values())
    params = lce.add_lora(unet, cfg)
    assert sum(p.numel() for p in params) == expected
    assert lce.count_params(unet, trainable=True) == expected
    assert lce.count_params(unet, trainable=False) == base


def test_unknown_target_module_is_a_user_error(make_cfg, load_tiny):
    cfg = make_cfg("--TARGET_MODULES=to_q,to_qq")
    unet = load_tiny(cfg)[3]
    with pytest.raises(lce.UserError, match="to_qq"):
        lce.add_lora(unet, cfg)


# ----------------------------------------------------------------------------- 4. SD1.5 counts
@pytest.mark.parametrize("rank, expected", [(4, 797_184), (8, 1_594_368)])
def test_sd15_lora_trainable_count_on_a_meta_unet(rank, expected):
    from lora_tools.sd15 import SD15_UNET_PARAMS, sd15_unet

    unet = sd15_unet("meta")
    assert next(unet.parameters()).device.type == "meta"
    assert lce.count_params(unet) == SD15_UNET_PARAMS == 859_520_964
    lce.freeze(unet)
    cfg = lce.resolve_config([f"--LORA_RANK={rank}", f"--LORA_ALPHA={rank}",
                              "--TARGET_MODULES=to_q,to_k,to_v,to_out.0"])
    params = lce.add_lora(unet, cfg)
    assert sum(p.numel() for p in params) == expected
    assert lce.count_params(unet, trainable=True) == expected
    assert lce.count_params(unet, trainable=False) == 859_520_964
    assert all(p.dtype == torch.float32 for p in params)
    # 16 transformer blocks x (attn1 + attn2) x 4 projections, each an A and a B
    assert len(params) == 16 * 2 * 4 * 2


# ----------------------------------------------------------------------------- 6. fp32 LoRA under bf16
def test_lora_is_fp32_over_a_bf16_model_and_one_bf16_autocast_step_keeps_it(make_cfg, load_tiny):
    from accelerate import Accelerator

    cfg = make_cfg()
    tok, te, vae, unet, sched = load_tiny(cfg, torch.bfloat16)
    params = lce.add_lora(unet, cfg)
    names = {id(p): n for n, p in unet.named_parameters()}
    for n, p in unet.named_parameters():
        if p.requires_grad:
            assert ".lora_" in n and p.dtype == torch.float32, (n, p.dtype)
        else:
            assert ".lora_" not in n and p.dtype == torch.bfloat16, (n, p.dtype)
    assert all(p.dtype == torch.bfloat16 for m in (te, vae) for p in m.parameters())
    assert sorted(map(id, params)) == sorted(id(p) for p in unet.parameters() if p.requires_grad)

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    seen = []
    lora_module = next(m for n, m in unet.named_modules() if n.endswith("lora_A.default"))
    hook = lora_module.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    batch = pixel_batch(cfg, tok, [0, 1])
    before = [p.detach().clone() for p in params]
    torch.manual_seed(0)
    with accelerator.autocast():
        loss = loss_of(batch, unet, sched, vae, te)
    hook.remove()
    assert seen == [torch.bfloat16]  # the step really ran under bf16 autocast
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    accelerator.backward(loss)
    for p in params:
        assert p.grad is not None and p.grad.dtype == torch.float32, names[id(p)]
        assert torch.isfinite(p.grad).all()
    assert total_grad_norm(params) > 0
    assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)
    accelerator.clip_grad_norm_(params, 1.0)
    optimizer.step()
    assert all(p.dtype == torch.float32 for p in params)
    assert all(p.dtype == torch.bfloat16 for p in unet.parameters() if not p.requires_grad)
    assert any(not torch.equal(p.detach(), b) for p, b in zip(params, before))


# ----------------------------------------------------------------------------- 7. clipping
@pytest.fixture
def lora_with_big_gradients(make_cfg, load_tiny):
    cfg = make_cfg()
    tok, te, vae, unet, sched = load_tiny(cfg)
    params = lce.add_lora(unet, cfg)
    with torch.no_grad():  # non-zero B, so that every A gets a gradient too
        for n, p in unet.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.01)
    batch = pixel_batch(cfg, tok, [0, 1])

    def backward(scale=1e4):
        for p in params:
            p.grad = None
        torch.manual_seed(0)
        (loss_of(batch, unet, sched, vae, te) * scale).backward()

    return unet, params, backward


def test_clip_grad_norm_bounds_the_lora_gradient_norm(lora_with_big_gradients):
    from accelerate import Accelerator

    unet, params, backward = lora_with_big_gradients
    accelerator = Accelerator(cpu=True)
    max_norm = 1.0
    backward()
    pre = total_grad_norm(params)
    assert pre > 100 * max_norm  # the test proves clipping happened
    grads = [p.grad.clone() for p in params]
    returned = accelerator.clip_grad_norm_(params, max_norm)
    assert float(returned) == pytest.approx(pre, rel=1e-5)
    post = total_grad_norm(params)
    assert post <= max_norm * (1 + 1e-5)
    assert post == pytest.approx(max_norm, rel=1e-4)
    factor = post / pre  # one factor for all tensors: the direction is kept
    for g, p in zip(grads, params):
        torch.testing.assert_close(p.grad, g * factor, rtol=1e-4, atol=1e-9)


def test_a_generator_consumed_earlier_would_clip_nothing(lora_with_big_gradients):
    """Why main passes the list of LoRA tensors: a generator of them, consumed by the optimizer,
    reaches clip_grad_norm_ empty, and nothing is clipped."""
    from accelerate import Accelerator

    unet, params, backward = lora_with_big_gradients
    accelerator = Accelerator(cpu=True)
    generator = (p for p in unet.parameters() if p.requires_grad)
    torch.optim.AdamW(generator, lr=1e-3)
    backward()
    pre = total_grad_norm(params)
    accelerator.clip_grad_norm_(generator, 1.0)
    assert total_grad_norm(params) == pre > 100


# ----------------------------------------------------------------------------- the script's reload check
@pytest.mark.parametrize("alpha", [4, 8])
def test_check_saved_lora_accepts_a_correct_file(make_cfg, load_tiny, tmp_path, alpha):
    """check_saved_lora (run by main after saving) must pass on a file save_lora just wrote, also
    when LORA_ALPHA != LORA_RANK (the file's metadata says alpha; the reload must use it), and
    must flag a file whose weights are wrong."""
    cfg = make_cfg("--LORA_RANK=4", f"--LORA_ALPHA={alpha}")
    unet = load_tiny(cfg)[3]
    lce.add_lora(unet, cfg)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for n, p in unet.named_parameters():
            if ".lora_B." in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    path = str(tmp_path / lce.WEIGHTS_NAME)
    lce.save_lora(path, unet, cfg)
    diff, effect, tolerance = lce.check_saved_lora(unet, path, cfg, nullcontext)
    assert effect > 100 * tolerance  # the adapter has a visible effect
    assert diff <= tolerance, f"alpha={alpha}: the reload differs by {diff:.3g} (tolerance {tolerance:.3g})"

    # a wrong file (B halved) must be caught
    tensors = {k: (v * 0.5 if "lora.up" in k or "lora_B" in k else v) for k, v in load_file(path).items()}
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    save_file(tensors, path, metadata=meta)
    diff, _, tolerance = lce.check_saved_lora(unet, path, cfg, nullcontext)
    assert diff > 100 * tolerance
