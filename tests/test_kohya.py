"""lora_tools.kohya: the kohya-ss (sd-scripts) LoRA file that WebUI and ComfyUI load.

The equivalence check: a tiny SD1.x pipeline gets LoRA on its UNet (diffusers' add_adapter) and on
its CLIP text encoder (PEFT's inject_adapter_in_model), with alpha != rank and non-zero B; we record
the UNet output on a fixed (latents, t, text embeddings) input and the text encoder's
last_hidden_state on fixed token ids. The kohya file is loaded into a FRESH pipeline with
`pipe.load_lora_weights` — diffusers' own kohya loader — and must reproduce both outputs, without
any message about unexpected or missing keys.

The pins (PIN_*) are the files the exporter wrote before it was rebuilt on diffusers'
convert_state_dict_to_kohya: key set, every .alpha value and the metadata dict stay exactly so.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
from collections import Counter  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import capture_library_messages, key_complaints  # noqa: E402
from lora_tools.config import UserError  # noqa: E402
from lora_tools.family import SD1  # noqa: E402
from lora_tools.kohya import kohya_metadata, save_kohya_file, to_kohya  # noqa: E402


def save_sd1(path, unet_sd, te_sd, unet_alpha, te_alpha, metadata, dtype=torch.float32, use_rslora=False):
    """save_kohya_file for an SD1.x LoRA of the UNet and (if te_sd) the text encoder."""
    state_dicts = {"unet": unet_sd, **({"text_encoder": te_sd} if te_sd else {})}
    save_kohya_file(path, state_dicts, {"unet": unet_alpha, "text_encoder": te_alpha}, dict(SD1.webui), metadata, dtype,
                    use_rslora=use_rslora)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
RANK, UNET_ALPHA, TE_ALPHA = 4, 8, 2  # alpha != rank, and different per model: a mix-up shows
B_STD = 0.05  # a clear but non-chaotic effect: the random tiny UNet amplifies rounding noise of huge updates


# ----------------------------------------------------------------------------- helpers
def load_pipeline(model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fixed_inputs(unet, text_encoder):
    g = torch.Generator().manual_seed(2024)
    z = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    c = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([37, 613])
    ids = torch.randint(2, text_encoder.config.vocab_size, (2, 77), generator=g)
    return z, t, c, ids


@torch.no_grad()
def outputs(pipe, inputs):
    z, t, c, ids = inputs
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return pipe.unet(z, t, c, return_dict=False)[0], pipe.text_encoder(ids).last_hidden_state


def add_loras(pipe, unet_targets=UNET_TARGETS, te_targets=TE_TARGETS, use_rslora=False, rank_pattern=None, seed=0):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=UNET_ALPHA, target_modules=list(unet_targets),
                                     init_lora_weights="gaussian", use_rslora=use_rslora,
                                     rank_pattern=rank_pattern or {}))
    # transformers 5 + peft 0.21: CLIPTextModel.add_adapter refuses, PEFT's own injection works
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=TE_ALPHA, target_modules=list(te_targets),
                                       init_lora_weights="gaussian", use_rslora=use_rslora),
                            pipe.text_encoder, adapter_name="default")
    with torch.no_grad():  # B = 0 after init; make the adapters do something
        for model in (pipe.unet, pipe.text_encoder):
            bs = [p for n, p in model.named_parameters() if ".lora_B." in n]
            assert bs, type(model).__name__
            for p in bs:
                p.normal_(0.0, B_STD)


def lora_state_dicts(pipe):
    from peft.utils import get_peft_model_state_dict

    return ({k: v.detach().clone() for k, v in get_peft_model_state_dict(pipe.unet).items()},
            {k: v.detach().clone() for k, v in get_peft_model_state_dict(pipe.text_encoder).items()})


def tol(reference, rel):
    return rel * max(1.0, reference.abs().max().item())


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


def targeted(model, targets):
    """Independent of PEFT and of the module under test: the layers a target list adapts."""
    return sorted(n for n, m in model.named_modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(n == t or n.endswith("." + t) for t in targets))


def read_file(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def f32(x):
    """x as a float32 .alpha tensor holds it."""
    return torch.tensor(x, dtype=torch.float32).item()


# ----------------------------------------------------------------------------- the pins
def fingerprint(tensors):
    """(entries, sha256 of the sorted key list, {.alpha value: how many layers}) of a kohya file."""
    assert all(v.shape == () and v.dtype == torch.float32 for k, v in tensors.items() if k.endswith(".alpha"))
    keys = hashlib.sha256("\n".join(sorted(tensors)).encode()).hexdigest()
    return len(tensors), keys, dict(Counter(v.item() for k, v in tensors.items() if k.endswith(".alpha")))


# sha256 of the sorted key list of each pinned file (the tiny model's layers, the targets of each test)
PIN_KEYS = {"unet_only": "8e2220d2f23aac4d8ba499ccbf38070bb57c06d93e09347a0c7051f80e50c703",
            "unet_and_te": "2774005d86c56b8ee6638e9e2fb656686cedfb2f1507c8f8e915973e8f29b9ef",
            "wide_rslora": "a5fa7998b0fe051c51c39d39df96dad086331580c78dc553e74f76bea81b7c91"}
# The settings every pinned metadata dict is made from, each one given (not a script default).
PIN_SETTINGS = ["--LORA_RANK=4", "--LORA_ALPHA=8", "--LORA_DROPOUT=0.1", "--LEARNING_RATE=0.0002",
                "--LR_SCHEDULER=cosine", "--LR_WARMUP_STEPS=5", "--MAX_GRAD_NORM=1.0", "--SEED=7", "--NUM_EPOCHS=3",
                "--GRADIENT_CHECKPOINTING=False", "--CACHE_LATENTS=True", "--RANDOM_FLIP=True", "--USE_DORA=False",
                "--TARGET_MODULES=to_q,to_k,to_v,to_out.0", "--TEXT_ENCODER_TARGET_MODULES=q_proj,k_proj,v_proj,out_proj",
                "--OUTPUT_NAME=pinned", "--USE_RSLORA=False", "--TRAIN_TEXT_ENCODER=False",
                "--TEXT_ENCODER_LEARNING_RATE=None", "--LORAPLUS_LR_RATIO=None", "--MAX_TRAIN_STEPS=30"]
STARTED, FINISHED = 1_700_000_000.5, 1_700_000_600.25
# ... and the metadata they give in every pinned file (each test adds the entries that differ)
PIN_COMMON = {"ss_network_dim": "4", "ss_network_alpha": "8", "ss_network_dropout": "0.1", "ss_learning_rate": "0.0002",
              "ss_unet_lr": "0.0002", "ss_lr_scheduler": "cosine", "ss_lr_warmup_steps": "5", "ss_max_grad_norm": "1.0",
              "ss_batch_size_per_device": "4", "ss_gradient_accumulation_steps": "1", "ss_seed": "7",
              "ss_gradient_checkpointing": "False", "ss_cache_latents": "True", "ss_flip_aug": "True",
              "ss_steps": "30", "ss_num_train_images": "8", "ss_training_started_at": "1700000000.5",
              "ss_training_finished_at": "1700000600.25", "ss_output_name": "pinned", "modelspec.title": "pinned",
              "ss_resolution": "(64, 64)", "modelspec.resolution": "64x64", "ss_sd_model_name": "tiny-sd"}


def script_metadata(make_cfg, *overrides):
    """kohya_metadata called as lora_complete_example.save_webui_file calls it."""
    cfg = make_cfg(*PIN_SETTINGS, *overrides)
    return kohya_metadata(dict(cfg.as_dict(), steps=30, num_images=8, started_at=STARTED, finished_at=FINISHED))


def sorted_json(**entries):
    return json.dumps(entries, sort_keys=True)


def check_metadata(metadata, expected):
    """The file's metadata is `expected`, plus the date and our version string (which vary)."""
    rest = {k: v for k, v in metadata.items() if k not in ("modelspec.date", "lora_complete_example_version")}
    assert rest == {"ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_network_module": "networks.lora",
                    "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/lora",
                    "modelspec.implementation": "diffusers", "format": "pt",
                    **{k: v for k, v in expected.items() if v is not None}}  # None: left out
    # sd-scripts: datetime.fromtimestamp(int(finished)).isoformat(), local time: 2023-11-14T22:23:20 in UTC
    assert metadata["modelspec.date"] == datetime.datetime.fromtimestamp(int(FINISHED)).isoformat()
    assert re.fullmatch(r"kohya-export/1 \(torch .+, diffusers .+, peft .+, transformers .+\)",
                        metadata["lora_complete_example_version"])


# ----------------------------------------------------------------------------- fixture
@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A tiny pipeline with "trained" LoRAs on UNet and text encoder, its outputs, its state dicts,
    and the outputs it gives with every update doubled (what doubling each .alpha must give)."""
    pipe = load_pipeline(tiny_model_dir)
    inputs = fixed_inputs(pipe.unet, pipe.text_encoder)
    base = outputs(pipe, inputs)
    n_layers = (len(targeted(pipe.unet, UNET_TARGETS)), len(targeted(pipe.text_encoder, TE_TARGETS)))
    add_loras(pipe)
    ref = outputs(pipe, inputs)
    unet_sd, te_sd = lora_state_dicts(pipe)
    with torch.no_grad():
        bs = [p for m in (pipe.unet, pipe.text_encoder) for n, p in m.named_parameters() if ".lora_B." in n]
        for p in bs:
            p.mul_(2)
        ref_doubled = outputs(pipe, inputs)
        for p in bs:
            p.div_(2)
    folder = tmp_path_factory.mktemp("kohya")
    return dict(model_dir=tiny_model_dir, inputs=inputs, base=base, ref=ref, ref_doubled=ref_doubled,
                n_layers=n_layers, unet_sd=unet_sd, te_sd=te_sd, folder=str(folder))


def load_and_run(trained, weight_name, folder=None):
    """A fresh pipeline + the file through diffusers' load_lora_weights -> (unet out, te out, messages)."""
    pipe = load_pipeline(trained["model_dir"])
    with capture_library_messages() as messages:
        pipe.load_lora_weights(folder or trained["folder"], weight_name=weight_name)
    y, h = outputs(pipe, trained["inputs"])
    return y, h, messages


def test_reference_adapters_change_both_models(trained):
    (y0, h0), (y, h) = trained["base"], trained["ref"]
    assert maxdiff(y, y0) > 0.05 and maxdiff(h, h0) > 0.05  # otherwise the equivalence checks prove nothing


# ----------------------------------------------------------------------------- UNet + text encoder
@pytest.fixture(scope="module")
def kohya_fp32(trained, make_cfg):
    path = os.path.join(trained["folder"], "kohya.safetensors")
    metadata = script_metadata(make_cfg, "--TRAIN_TEXT_ENCODER=True", "--MAX_TRAIN_STEPS=None", "--LORAPLUS_LR_RATIO=16",
                               "--MIXED_PRECISION=auto")
    save_sd1(path, trained["unet_sd"], trained["te_sd"], UNET_ALPHA, TE_ALPHA, metadata, torch.float32)
    tensors, metadata = read_file(path)
    return dict(path=path, tensors=tensors, metadata=metadata)


def test_kohya_file_reproduces_unet_and_text_encoder(trained, kohya_fp32):
    y, h, messages = load_and_run(trained, "kohya.safetensors")
    assert messages == []  # not a single warning from diffusers / peft / transformers
    y_ref, h_ref = trained["ref"]
    assert maxdiff(y, y_ref) <= tol(y_ref, 1e-5), maxdiff(y, y_ref)
    assert maxdiff(h, h_ref) <= tol(h_ref, 1e-5), maxdiff(h, h_ref)


def test_key_complaints_are_caught(trained, kohya_fp32):
    """Control for the no-warning checks: a kohya file naming a layer the UNet lacks is reported."""
    from safetensors.torch import save_file

    tensors = {k.replace("_attn1_to_q.", "_attn1_to_qq."): v for k, v in kohya_fp32["tensors"].items()}
    save_file(tensors, os.path.join(trained["folder"], "kohya_bad.safetensors"), metadata={"format": "pt"})
    _, _, messages = load_and_run(trained, "kohya_bad.safetensors")
    complaints = key_complaints(messages)
    assert complaints and all("attn1.to.qq.lora_" in m for m in complaints), messages  # the renamed layers, named


def test_pinned_unet_and_text_encoder_file(trained, kohya_fp32):
    tensors = kohya_fp32["tensors"]
    n_unet, n_te = trained["n_layers"]
    assert n_unet == 80 and n_te == 8  # 10 transformer blocks x 2 attentions x 4; 2 CLIP layers x 4
    assert fingerprint(tensors) == (3 * (n_unet + n_te), PIN_KEYS["unet_and_te"], {8.0: n_unet, 2.0: n_te})
    # exact spellings, as sd-scripts writes them for SD1.x, and the PEFT tensors unchanged
    a, b = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    o = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0"
    te = "lora_te_text_model_encoder_layers_1_self_attn_out_proj"
    assert torch.equal(tensors[q + ".lora_down.weight"], trained["unet_sd"][a + ".lora_A.weight"])
    assert torch.equal(tensors[q + ".lora_up.weight"], trained["unet_sd"][a + ".lora_B.weight"])
    assert torch.equal(tensors[o + ".lora_up.weight"], trained["unet_sd"][b + ".lora_B.weight"])
    te_key = next(k for k in trained["te_sd"] if k.endswith("layers.1.self_attn.out_proj.lora_A.weight"))
    assert torch.equal(tensors[te + ".lora_down.weight"], trained["te_sd"][te_key])
    assert tensors[q + ".alpha"].item() == UNET_ALPHA and tensors[te + ".alpha"].item() == TE_ALPHA
    n_peft = sum(v.numel() for v in trained["unet_sd"].values()) + sum(v.numel() for v in trained["te_sd"].values())
    assert sum(v.numel() for k, v in tensors.items() if not k.endswith(".alpha")) == n_peft  # every LoRA number, once
    check_metadata(kohya_fp32["metadata"], {
        **PIN_COMMON, "ss_mixed_precision": None, "ss_max_train_steps": None, "ss_num_epochs": "3",
        "ss_text_encoder_lr": "0.0002", "ss_dataset_dirs": json.dumps({"shapes": {"n_repeats": 1, "img_count": 8}}),
        "ss_network_args": sorted_json(
            loraplus_lr_ratio=16, target_modules=UNET_TARGETS, text_encoder_target_modules=TE_TARGETS,
            train_text_encoder=True, use_dora=False, use_rslora=False)})


# ----------------------------------------------------------------------------- alpha is read, dtype, UNet only
def test_kohya_alpha_entries_set_the_strength(trained, kohya_fp32):
    """Doubling every .alpha must give exactly the model with every update doubled."""
    from safetensors.torch import save_file

    tensors = {k: (v * 2 if k.endswith(".alpha") else v) for k, v in kohya_fp32["tensors"].items()}
    save_file(tensors, os.path.join(trained["folder"], "kohya_alpha_x2.safetensors"), metadata={"format": "pt"})
    y, h, messages = load_and_run(trained, "kohya_alpha_x2.safetensors")
    assert not key_complaints(messages)
    (y_ref, h_ref), (y2, h2) = trained["ref"], trained["ref_doubled"]
    assert maxdiff(y, y_ref) > 100 * tol(y_ref, 1e-5) and maxdiff(h, h_ref) > 100 * tol(h_ref, 1e-5)
    assert maxdiff(y, y2) <= tol(y2, 1e-5) and maxdiff(h, h2) <= tol(h2, 1e-5)


@pytest.mark.parametrize("dtype, rel, of_effect", [(torch.float16, 2e-3, 0.02), (torch.bfloat16, 1.6e-2, 0.05)])
def test_kohya_file_half_precision(trained, dtype, rel, of_effect):
    name = f"kohya_{str(dtype).replace('torch.', '')}.safetensors"
    save_sd1(os.path.join(trained["folder"], name), trained["unet_sd"], trained["te_sd"], UNET_ALPHA, TE_ALPHA,
                    {}, dtype)
    tensors, metadata = read_file(os.path.join(trained["folder"], name))
    assert {v.dtype for v in tensors.values()} == {dtype}  # .alpha too, as sd-scripts saves it
    assert all(v.shape == () and v.item() in (UNET_ALPHA, TE_ALPHA) for k, v in tensors.items() if k.endswith(".alpha"))
    assert metadata == {"format": "pt"}
    y, h, messages = load_and_run(trained, name)
    assert not key_complaints(messages)
    (y0, h0), (y_ref, h_ref) = trained["base"], trained["ref"]
    # rounding A and B (fp16: relative 2^-11, bf16: 2^-8) moves the output far less than the adapter does
    assert maxdiff(y, y_ref) <= min(tol(y_ref, rel), of_effect * maxdiff(y_ref, y0)), maxdiff(y, y_ref)
    assert maxdiff(h, h_ref) <= min(tol(h_ref, rel), of_effect * maxdiff(h_ref, h0)), maxdiff(h, h_ref)


def test_unet_only_kohya_file(trained, make_cfg):
    """As the script writes it without TRAIN_TEXT_ENCODER: te_sd = {} and LORA_ALPHA for both."""
    path = os.path.join(trained["folder"], "kohya_unet_only.safetensors")
    save_sd1(path, trained["unet_sd"], {}, UNET_ALPHA, UNET_ALPHA, script_metadata(make_cfg), torch.float32)
    tensors, metadata = read_file(path)
    assert fingerprint(tensors) == (3 * 80, PIN_KEYS["unet_only"], {8.0: 80})
    assert all(k.startswith("lora_unet_") for k in tensors)
    check_metadata(metadata, {**PIN_COMMON, "ss_mixed_precision": "no", "ss_max_train_steps": "30",
                              "ss_dataset_dirs": json.dumps({"shapes": {"n_repeats": 1, "img_count": 8}}),
                              "ss_network_args": sorted_json(
                                  target_modules=UNET_TARGETS, train_text_encoder=False, use_dora=False, use_rslora=False)})
    y, h, messages = load_and_run(trained, "kohya_unet_only.safetensors")
    assert all("No LoRA keys associated to CLIPTextModel" in m for m in messages), messages  # the expected notice
    (y_ref, _), (_, h0) = trained["ref"], trained["base"]
    assert maxdiff(y, y_ref) <= tol(y_ref, 1e-5)
    assert torch.equal(h, h0)  # the text encoder is untouched


def test_wider_targets_rank_pattern_and_rslora(tiny_model_dir, tmp_path, trained, make_cfg):
    """sd-scripts' default SD1.x targets (every Linear / 1x1 conv of the transformer blocks, CLIP
    attention + MLP), a per-layer rank, and rsLoRA (written as alpha*sqrt(r), since a kohya file
    always means alpha/r)."""
    unet_targets = UNET_TARGETS + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
    te_targets = TE_TARGETS + ["fc1", "fc2"]
    pipe = load_pipeline(tiny_model_dir)
    inputs = fixed_inputs(pipe.unet, pipe.text_encoder)
    n_unet, n_te = len(targeted(pipe.unet, unet_targets)), len(targeted(pipe.text_encoder, te_targets))
    add_loras(pipe, unet_targets, te_targets, use_rslora=True, rank_pattern={"ff.net.2": 2}, seed=1)
    assert any(isinstance(m, torch.nn.Conv2d) for n, m in pipe.unet.named_modules() if n.endswith("proj_in.base_layer"))
    y_ref, h_ref = outputs(pipe, inputs)
    unet_sd, te_sd = lora_state_dicts(pipe)
    metadata = script_metadata(make_cfg, "--USE_RSLORA=True", "--TRAIN_TEXT_ENCODER=True",
                               "--TEXT_ENCODER_LEARNING_RATE=5e-5", "--MODEL_ID=stable-diffusion-v1-5/stable-diffusion-v1-5",
                               "--DATA_DIR=None", "--TARGET_MODULES=" + ",".join(unet_targets),
                               "--TEXT_ENCODER_TARGET_MODULES=" + ",".join(te_targets))
    save_sd1(str(tmp_path / "wide.safetensors"), unet_sd, te_sd, UNET_ALPHA, TE_ALPHA, metadata, use_rslora=True)
    tensors, metadata = read_file(str(tmp_path / "wide.safetensors"))
    assert (n_unet, n_te) == (10 * 12, 2 * 6)
    n_ff2 = 10  # one ff.net.2 per transformer block, at rank 2
    assert fingerprint(tensors) == (3 * (n_unet + n_te), PIN_KEYS["wide_rslora"], {
        f32(UNET_ALPHA * math.sqrt(RANK)): n_unet - n_ff2, f32(UNET_ALPHA * math.sqrt(2)): n_ff2,
        f32(TE_ALPHA * math.sqrt(RANK)): n_te})
    ff2 = "lora_unet_up_blocks_3_attentions_1_transformer_blocks_0_ff_net_2"
    assert tensors[ff2 + ".lora_down.weight"].shape[0] == 2
    assert tensors[ff2 + ".alpha"].item() == pytest.approx(UNET_ALPHA * math.sqrt(2))
    assert tensors["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].ndim == 4  # 1x1 conv, as kohya
    assert tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"].item() == pytest.approx(TE_ALPHA * 2)
    check_metadata(metadata, {
        **PIN_COMMON, "ss_mixed_precision": "no", "ss_max_train_steps": "30", "ss_text_encoder_lr": "5e-05",
        "ss_sd_model_name": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "ss_dataset_dirs": json.dumps({"lambdalabs/naruto-blip-captions": {"n_repeats": 1, "img_count": 8}}),
        "ss_network_args": sorted_json(
            target_modules=unet_targets, text_encoder_target_modules=te_targets, train_text_encoder=True,
            use_dora=False, use_rslora=True)})
    y, h, messages = load_and_run(trained, "wide.safetensors", folder=str(tmp_path))
    assert not key_complaints(messages), key_complaints(messages)
    assert maxdiff(y, y_ref) <= tol(y_ref, 1e-5), maxdiff(y, y_ref)
    assert maxdiff(h, h_ref) <= tol(h_ref, 1e-5), maxdiff(h, h_ref)


# ----------------------------------------------------------------------------- SD1.5 names, refusals
def test_every_sd15_name_is_one_comfyui_and_webui_look_up():
    """On SD1.5's own module tree (meta device, no weights), sd-scripts' default targets give its
    192 UNet + 72 text-encoder modules, each named as ComfyUI's model_lora_keys_unet/_clip look it
    up (a name they do not know is dropped: silently in WebUI)."""
    from lora_tools.sd15 import sd15_text_encoder, sd15_unet

    unet, te = sd15_unet("meta"), sd15_text_encoder("meta")
    # sd-scripts adapts every Linear and 1x1 Conv2d inside each Transformer2DModel (an "attentions.N" block)
    unet_layers = [n for n, m in unet.named_modules()
                   if ".attentions." in n and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    te_layers = [n for n, m in te.named_modules() if n.endswith(tuple(TE_TARGETS + ["fc1", "fc2"]))]
    assert len(unet_layers) == 192 and len(te_layers) == 72

    def fake(layers):
        return {f"{n}.lora_{ab}.weight": torch.zeros(1, 1) for n in layers for ab in "AB"}

    names = {k.split(".")[0] for k in to_kohya({"unet": fake(unet_layers), "text_encoder": fake(te_layers)},
                                                {"unet": 1, "text_encoder": 1}, dict(SD1.webui))}
    # ComfyUI (comfy/lora.py): "lora_unet_" + diffusers UNet key with '.' -> '_', and for CLIP
    # "lora_te_text_model_encoder_layers_{b}_{c}" over its LORA_CLIP_MAP; WebUI's regexes read the same
    clip_map = ["mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_q_proj", "self_attn_v_proj", "self_attn_out_proj"]
    assert names == ({"lora_unet_" + n.replace(".", "_") for n in unet_layers}
                     | {f"lora_te_text_model_encoder_layers_{b}_{c}" for b in range(12) for c in clip_map})
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0" in names


def test_refusals(trained, tmp_path):
    unet_sd, te_sd = trained["unet_sd"], trained["te_sd"]
    path = tmp_path / "k.safetensors"
    save_sd1(str(path), unet_sd, te_sd, UNET_ALPHA, TE_ALPHA, {}, torch.float32)
    good = path.read_bytes()
    key = next(k for k in unet_sd if k.endswith("lora_B.weight"))
    nan = dict(unet_sd)
    nan[key] = unet_sd[key].clone()
    nan[key][0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN/inf"):
        save_sd1(str(path), nan, te_sd, UNET_ALPHA, TE_ALPHA, {}, torch.float32)
    big = dict(unet_sd)
    big[key] = unet_sd[key] + 1e5  # finite in fp32, inf in fp16
    save_sd1(str(tmp_path / "big32.safetensors"), big, {}, UNET_ALPHA, UNET_ALPHA, {}, torch.float32)
    with pytest.raises(UserError, match="float16"):
        save_sd1(str(path), big, {}, UNET_ALPHA, UNET_ALPHA, {}, torch.float16)
    assert path.read_bytes() == good  # the earlier file is kept whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big32.safetensors", "k.safetensors"]  # no temp files
