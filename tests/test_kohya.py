"""lora_tools.kohya: the kohya-ss (sd-scripts) LoRA file that WebUI and ComfyUI load.

The equivalence check: a tiny SD1.x pipeline gets LoRA on its UNet (diffusers' add_adapter) and on
its CLIP text encoder (PEFT's inject_adapter_in_model), with alpha != rank and non-zero B; we record
the UNet output on a fixed (latents, t, text embeddings) input and the text encoder's
last_hidden_state on fixed token ids. Each file (the diffusers one as a control, then the kohya one)
is loaded into a FRESH pipeline with `pipe.load_lora_weights` — diffusers' own kohya loader — and
must reproduce both outputs, without any message about unexpected or missing keys.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import capture_library_messages, key_complaints  # noqa: E402
from lora_tools.config import UserError  # noqa: E402
from lora_tools.kohya import (  # noqa: E402
    KNOWN_INFO_KEYS,
    kohya_metadata,
    kohya_module_name,
    save_kohya_file,
    to_kohya,
)

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


def peft_metadata(config):
    d = config.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}


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
    return dict(pipe=pipe, model_dir=tiny_model_dir, inputs=inputs, base=base, ref=ref, ref_doubled=ref_doubled,
                n_layers=n_layers,
                unet_sd=unet_sd, te_sd=te_sd, folder=str(folder))


def load_and_run(trained, weight_name):
    """A fresh pipeline + the file through diffusers' load_lora_weights -> (unet out, te out, messages)."""
    pipe = load_pipeline(trained["model_dir"])
    with capture_library_messages() as messages:
        pipe.load_lora_weights(trained["folder"], weight_name=weight_name)
    y, h = outputs(pipe, trained["inputs"])
    return y, h, messages


def test_reference_adapters_change_both_models(trained):
    (y0, h0), (y, h) = trained["base"], trained["ref"]
    assert maxdiff(y, y0) > 0.05 and maxdiff(h, h0) > 0.05  # otherwise the equivalence checks prove nothing


# ----------------------------------------------------------------------------- the diffusers file (control)
def test_diffusers_file_reproduces_the_adapters(trained):
    from diffusers import StableDiffusionPipeline

    pipe = trained["pipe"]
    StableDiffusionPipeline.save_lora_weights(
        trained["folder"], unet_lora_layers=trained["unet_sd"], text_encoder_lora_layers=trained["te_sd"],
        weight_name="diffusers.safetensors", safe_serialization=True,
        unet_lora_adapter_metadata=peft_metadata(pipe.unet.peft_config["default"]),
        text_encoder_lora_adapter_metadata=peft_metadata(pipe.text_encoder.peft_config["default"]))
    y, h, messages = load_and_run(trained, "diffusers.safetensors")
    assert not key_complaints(messages), key_complaints(messages)
    y_ref, h_ref = trained["ref"]
    assert maxdiff(y, y_ref) <= tol(y_ref, 1e-5)
    assert maxdiff(h, h_ref) <= tol(h_ref, 1e-5)


# ----------------------------------------------------------------------------- the kohya file
@pytest.fixture(scope="module")
def kohya_fp32(trained):
    path = os.path.join(trained["folder"], "kohya.safetensors")
    info = dict(base_model="stable-diffusion-v1-5/stable-diffusion-v1-5", rank=RANK, alpha=float(UNET_ALPHA),
                resolution=512, max_train_steps=100, steps=100, epoch=2, num_epochs=2, dataset="shapes",
                num_train_images=8, learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=5e-5, seed=42,
                mixed_precision="bf16", training_started_at=1_700_000_000.5, training_finished_at=1_700_000_600.25,
                output_name="my_lora", network_args={"target_modules": UNET_TARGETS, "use_dora": False},
                prediction_type="epsilon")
    n = save_kohya_file(path, trained["unet_sd"], trained["te_sd"], UNET_ALPHA, TE_ALPHA, kohya_metadata(info),
                        torch.float32)
    tensors, metadata = read_file(path)
    return dict(path=path, tensors=tensors, metadata=metadata, n_params=n, info=info)


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
    assert key_complaints(messages)


def test_kohya_key_names_count_and_alphas(trained, kohya_fp32):
    tensors = kohya_fp32["tensors"]
    n_unet, n_te = trained["n_layers"]
    assert n_unet == 80 and n_te == 8  # 10 transformer blocks x 2 attentions x 4; 2 CLIP layers x 4
    assert len(tensors) == 3 * (n_unet + n_te)
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert len(modules) == n_unet + n_te
    for m in modules:  # exactly down, up and alpha per module
        assert {k for k in tensors if k.startswith(m + ".")} == {m + ".lora_down.weight", m + ".lora_up.weight", m + ".alpha"}
    # exact spellings, as sd-scripts writes them for SD1.x
    a, b = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    o = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0"
    te = "lora_te_text_model_encoder_layers_1_self_attn_out_proj"
    assert torch.equal(tensors[q + ".lora_down.weight"], trained["unet_sd"][a + ".lora_A.weight"])
    assert torch.equal(tensors[q + ".lora_up.weight"], trained["unet_sd"][a + ".lora_B.weight"])
    assert torch.equal(tensors[o + ".lora_up.weight"], trained["unet_sd"][b + ".lora_B.weight"])
    te_key = next(k for k in trained["te_sd"] if k.endswith("layers.1.self_attn.out_proj.lora_A.weight"))
    assert torch.equal(tensors[te + ".lora_down.weight"], trained["te_sd"][te_key])
    assert tensors[q + ".lora_down.weight"].shape == (RANK, 16) and tensors[q + ".lora_up.weight"].shape == (16, RANK)
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in tensors)
    # alpha: a 0-dim tensor in the weights' dtype holding lora_alpha (not the rank)
    for k, v in tensors.items():
        if k.endswith(".alpha"):
            assert v.shape == () and v.dtype == torch.float32
            assert v.item() == (UNET_ALPHA if k.startswith("lora_unet_") else TE_ALPHA)
    assert kohya_fp32["n_params"] == sum(v.numel() for k, v in tensors.items() if not k.endswith(".alpha"))


def test_unet_names_agree_with_diffusers_convert_state_dict_to_kohya(trained, kohya_fp32):
    """diffusers' own PEFT->kohya helper spells the UNet the same way; for the text encoder it
    writes SDXL's lora_te1_ and, under transformers 5, drops text_model_ — which is why we do not use it."""
    from diffusers.utils import convert_state_dict_to_kohya

    theirs = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in trained["unet_sd"].items()})
    ours = {k: v for k, v in kohya_fp32["tensors"].items() if k.startswith("lora_unet_")}
    assert sorted(theirs) == sorted(ours)
    for k, v in ours.items():
        if not k.endswith(".alpha"):
            assert torch.equal(theirs[k], v)


def test_kohya_metadata_values(kohya_fp32):
    meta = kohya_fp32["metadata"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    expected = {
        "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "8.0",
        "ss_resolution": "(512, 512)",
        "ss_max_train_steps": "100",
        "ss_steps": "100",
        "ss_epoch": "2",
        "ss_num_epochs": "2",
        "ss_num_train_images": "8",
        "ss_learning_rate": "0.0001",
        "ss_unet_lr": "0.0001",
        "ss_text_encoder_lr": "5e-05",
        "ss_seed": "42",
        "ss_mixed_precision": "bf16",
        "ss_training_started_at": "1700000000.5",
        "ss_training_finished_at": "1700000600.25",
        "ss_output_name": "my_lora",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "my_lora",
        "modelspec.resolution": "512x512",
        "modelspec.prediction_type": "epsilon",
        "format": "pt",
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert json.loads(meta["ss_dataset_dirs"]) == {"shapes": {"n_repeats": 1, "img_count": 8}}
    assert json.loads(meta["ss_network_args"]) == {"target_modules": UNET_TARGETS, "use_dora": False}
    assert meta["modelspec.date"].startswith("2023-11-1")  # ISO 8601, local time of training_finished_at
    assert meta["lora_complete_example_version"].startswith("kohya-export/")
    extra = {k for k in meta if not k.startswith(("ss_", "modelspec."))}
    assert extra == {"format", "lora_complete_example_version"}


def test_kohya_metadata_rules(tmp_path):
    assert kohya_metadata({})["ss_network_module"] == "networks.lora"
    with pytest.raises(ValueError, match="unknown keys.*learnig_rate"):
        kohya_metadata({"learnig_rate": 1e-4})
    meta = kohya_metadata({"seed": None, "resolution": (640, 512), "prediction_type": "v_prediction",
                           "base_model": str(tmp_path), "training_finished_at": 1_700_000_000})
    assert "ss_seed" not in meta  # None = unknown: left out
    assert meta["ss_resolution"] == "(640, 512)" and meta["modelspec.resolution"] == "640x512"
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["ss_sd_model_name"] == os.path.basename(str(tmp_path))  # local model: its name, as sd-scripts
    assert meta["modelspec.title"] == "LoRA@1700000000"
    assert all(isinstance(v, str) for v in meta.values())
    assert {"rank", "alpha", "dataset", "network_args"} <= KNOWN_INFO_KEYS


def test_kohya_metadata_from_the_scripts_settings(make_cfg):
    """The script can pass its settings as they are (cfg.as_dict()) plus the facts of the run."""
    cfg = make_cfg("--LORA_RANK=8", "--LORA_ALPHA=16", "--MAX_TRAIN_STEPS=30", "--TRAIN_TEXT_ENCODER=True",
                   "--TEXT_ENCODER_LEARNING_RATE=5e-5", "--USE_RSLORA=True")
    meta = kohya_metadata(dict(cfg.as_dict(), steps=30, epoch=4, num_images=8, started_at=1_700_000_000.0,
                               finished_at=1_700_000_060.0))
    assert all(isinstance(v, str) for v in meta.values())
    expected = {"ss_network_dim": "8", "ss_network_alpha": "16", "ss_max_train_steps": "30", "ss_steps": "30",
                "ss_epoch": "4", "ss_mixed_precision": "no", "ss_learning_rate": "0.0001", "ss_unet_lr": "0.0001",
                "ss_text_encoder_lr": "5e-05", "ss_num_train_images": "8", "ss_sd_model_name": "tiny-sd",
                "ss_resolution": "(64, 64)", "ss_training_finished_at": "1700000060.0", "ss_output_name": cfg.OUTPUT_NAME}
    assert {k: meta.get(k) for k in expected} == expected
    assert "ss_num_epochs" not in meta  # NUM_EPOCHS is ignored when MAX_TRAIN_STEPS is set
    assert json.loads(meta["ss_dataset_dirs"]) == {"shapes": {"n_repeats": 1, "img_count": 8}}
    args = json.loads(meta["ss_network_args"])
    assert args["use_rslora"] is True and args["target_modules"] == list(cfg.TARGET_MODULES)
    assert args["text_encoder_target_modules"] == list(cfg.TEXT_ENCODER_TARGET_MODULES)
    assert kohya_metadata({"LORA_RANK": 8, "rank": 4})["ss_network_dim"] == "4"  # explicit facts win
    assert "ss_mixed_precision" not in kohya_metadata({"MIXED_PRECISION": "auto"})  # not a fact until resolved
    assert "ss_text_encoder_lr" not in kohya_metadata({"LEARNING_RATE": 1e-4, "TRAIN_TEXT_ENCODER": False})


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
    save_kohya_file(os.path.join(trained["folder"], name), trained["unet_sd"], trained["te_sd"], UNET_ALPHA, TE_ALPHA,
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


def test_unet_only_kohya_file(trained):
    path = os.path.join(trained["folder"], "kohya_unet_only.safetensors")
    save_kohya_file(path, trained["unet_sd"], None, UNET_ALPHA, None, {}, torch.float32)
    tensors, _ = read_file(path)
    assert all(k.startswith("lora_unet_") for k in tensors) and len(tensors) == 3 * 80
    y, h, messages = load_and_run(trained, "kohya_unet_only.safetensors")
    assert all("No LoRA keys associated to CLIPTextModel" in m for m in messages), messages  # the expected notice
    (y_ref, _), (_, h0) = trained["ref"], trained["base"]
    assert maxdiff(y, y_ref) <= tol(y_ref, 1e-5)
    assert torch.equal(h, h0)  # the text encoder is untouched


def test_wider_targets_rank_pattern_and_rslora(tiny_model_dir, tmp_path):
    """sd-scripts' default SD1.x targets (every Linear / 1x1 conv of the transformer blocks, CLIP
    attention + MLP), a per-layer rank, and rsLoRA (written as alpha*sqrt(r), since a kohya file
    always means alpha/r)."""
    unet_targets = UNET_TARGETS + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
    te_targets = TE_TARGETS + ["fc1", "fc2"]
    pipe = load_pipeline(tiny_model_dir)
    inputs = fixed_inputs(pipe.unet, pipe.text_encoder)
    n_layers = len(targeted(pipe.unet, unet_targets)) + len(targeted(pipe.text_encoder, te_targets))
    add_loras(pipe, unet_targets, te_targets, use_rslora=True, rank_pattern={"ff.net.2": 2}, seed=1)
    assert any(isinstance(m, torch.nn.Conv2d) for n, m in pipe.unet.named_modules() if n.endswith("proj_in.base_layer"))
    y_ref, h_ref = outputs(pipe, inputs)
    unet_sd, te_sd = lora_state_dicts(pipe)
    path = tmp_path / "wide.safetensors"
    save_kohya_file(str(path), unet_sd, te_sd, UNET_ALPHA, TE_ALPHA, {}, use_rslora=True)
    tensors, _ = read_file(str(path))
    assert n_layers == 10 * 12 + 2 * 6 and len(tensors) == 3 * n_layers
    ff2 = "lora_unet_up_blocks_3_attentions_1_transformer_blocks_0_ff_net_2"
    assert tensors[ff2 + ".lora_down.weight"].shape[0] == 2
    assert tensors[ff2 + ".alpha"].item() == pytest.approx(UNET_ALPHA * math.sqrt(2))
    assert tensors["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].ndim == 4  # 1x1 conv, as kohya
    fresh = load_pipeline(tiny_model_dir)
    with capture_library_messages() as messages:
        fresh.load_lora_weights(str(tmp_path), weight_name="wide.safetensors")
    assert not key_complaints(messages), key_complaints(messages)
    y, h = outputs(fresh, inputs)
    assert maxdiff(y, y_ref) <= tol(y_ref, 1e-5), maxdiff(y, y_ref)
    assert maxdiff(h, h_ref) <= tol(h_ref, 1e-5), maxdiff(h, h_ref)


# ----------------------------------------------------------------------------- SD1.5 names, refusals
def test_names_on_the_real_sd15_architecture():
    """On SD1.5's own module tree (meta device, no weights): sd-scripts' default targets give its
    well-known 192 UNet + 72 text-encoder LoRA modules, spelled as in published SD1.5 LoRAs."""
    from lora_tools.sd15 import sd15_text_encoder, sd15_unet

    unet, te = sd15_unet("meta"), sd15_text_encoder("meta")
    # sd-scripts adapts every Linear and 1x1 Conv2d inside each Transformer2DModel (an "attentions.N" block)
    unet_layers = [n for n, m in unet.named_modules()
                   if ".attentions." in n and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    te_layers = [n for n, m in te.named_modules() if n.endswith(tuple(TE_TARGETS + ["fc1", "fc2"]))]
    assert len(unet_layers) == 192 and len(te_layers) == 72

    def fake(layers):
        return {f"{n}.lora_{ab}.weight": torch.zeros(1, 1) for n in layers for ab in "AB"}

    names = {k.split(".")[0] for k in to_kohya(fake(unet_layers), fake(te_layers), 1, 1)}
    assert len(names) == 264
    for known in ("lora_unet_down_blocks_0_attentions_0_proj_in",
                  "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
                  "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
                  "lora_te_text_model_encoder_layers_11_self_attn_q_proj",
                  "lora_te_text_model_encoder_layers_0_mlp_fc2"):
        assert known in names
    assert kohya_module_name("text_model.encoder.layers.0.mlp.fc1", "text_encoder") == "lora_te_text_model_encoder_layers_0_mlp_fc1"
    assert kohya_module_name("encoder.layers.0.mlp.fc1", "text_encoder") == "lora_te_text_model_encoder_layers_0_mlp_fc1"


def test_accepts_prefixed_and_diffusers_spellings(trained):
    from diffusers.utils import convert_state_dict_to_diffusers

    plain = to_kohya(trained["unet_sd"], trained["te_sd"], UNET_ALPHA, TE_ALPHA)
    # what lora_complete_example.lora_state_dict writes: 'unet.' + diffusers spelling (to_q.lora.down ...)
    unet_file = {f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(trained["unet_sd"]).items()}
    te_file = {f"text_encoder.{k}": v for k, v in convert_state_dict_to_diffusers(trained["te_sd"]).items()}
    assert any(".lora.down." in k for k in unet_file)
    other = to_kohya(unet_file, te_file, UNET_ALPHA, TE_ALPHA)
    assert sorted(other) == sorted(plain) and all(torch.equal(other[k], plain[k]) for k in plain)


def test_refusals(trained, tmp_path):
    unet_sd, te_sd = trained["unet_sd"], trained["te_sd"]
    path = tmp_path / "k.safetensors"
    save_kohya_file(str(path), unet_sd, te_sd, UNET_ALPHA, TE_ALPHA, {}, torch.float32)
    good = path.read_bytes()
    key = next(k for k in unet_sd if k.endswith("lora_B.weight"))
    nan = dict(unet_sd)
    nan[key] = unet_sd[key].clone()
    nan[key][0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN/inf"):
        save_kohya_file(str(path), nan, te_sd, UNET_ALPHA, TE_ALPHA, {}, torch.float32)
    big = dict(unet_sd)
    big[key] = unet_sd[key] + 1e5  # finite in fp32, inf in fp16
    save_kohya_file(str(tmp_path / "big32.safetensors"), big, None, UNET_ALPHA, None, {}, torch.float32)
    with pytest.raises(UserError, match="float16"):
        save_kohya_file(str(path), big, None, UNET_ALPHA, None, {}, torch.float16)
    assert path.read_bytes() == good  # the earlier file is kept whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big32.safetensors", "k.safetensors"]  # no temp files
    dora = dict(unet_sd)
    dora[key.replace("lora_B.weight", "lora_magnitude_vector")] = torch.ones(4)
    with pytest.raises(UserError, match="DoRA"):
        to_kohya(dora, None, UNET_ALPHA, None)
    with pytest.raises(ValueError, match="not a LoRA A/B weight"):
        to_kohya({**unet_sd, key.replace("lora_B.weight", "lora_B.bias"): torch.zeros(3)}, None, UNET_ALPHA, None)
    with pytest.raises(ValueError, match="only its down"):
        to_kohya({k: v for k, v in unet_sd.items() if k != key}, None, UNET_ALPHA, None)
    for alpha in (0, -1, float("nan"), None, True):
        with pytest.raises(ValueError, match="alpha"):
            to_kohya(unet_sd, None, alpha, None)
    with pytest.raises(ValueError, match="empty"):
        to_kohya({}, None, UNET_ALPHA, None)
    with pytest.raises(ValueError, match="str -> str"):
        save_kohya_file(str(path), unet_sd, None, UNET_ALPHA, None, {"ss_network_dim": 4})
