"""Beyond one plain adapter, through the files the script writes: the metadata of both files,
SAVE_DTYPE=fp16, two LoRAs combined, the merged pipeline, DoRA and rsLoRA. Each run is lce.main on
the tiny model; the feature run and the two small LoRAs are shared (conftest)."""
import datetime
import json
import math
import os

import pytest
import torch

import lora_complete_example as lce
from conftest import (FEATURE_RUN, WEBUI_NAME, assert_close, capture_library_messages, fresh_pipe, key_complaints,
                      lora_layer_names, lora_weights, maxdiff, outputs, pipe_outputs, read_safetensors, reference_unet,
                      run_main, tol)

R = FEATURE_RUN


def rerun(run, out, *extra):
    """The same run's arguments into another OUTPUT_DIR, with `extra` added."""
    return run_main([a for a in run.argv if not a.startswith("--OUTPUT_DIR=")] + [f"--OUTPUT_DIR={out}", *extra])


def tensor_bytes(path):
    """Bytes of a safetensors file's tensor data (file size minus the 8-byte length and the header)."""
    with open(path, "rb") as f:
        return os.path.getsize(path) - 8 - int.from_bytes(f.read(8), "little")


def lora_pair(tensors, module, prefix="unet"):
    """(down = A (r x in), up = B (out x r)) of one adapted layer in a diffusers-format LoRA file."""
    keys = [k for k in tensors if k.startswith(f"{prefix}.{module}.")]
    down = [k for k in keys if k.endswith((".down.weight", ".lora_A.weight"))]
    up = [k for k in keys if k.endswith((".up.weight", ".lora_B.weight"))]
    assert len(keys) == 2 and len(down) == len(up) == 1, keys
    return tensors[down[0]].float(), tensors[up[0]].float()


# ----------------------------------------------------------------------------- metadata
def test_training_config_metadata_is_the_resolved_config(feature_run):
    _, meta = read_safetensors(os.path.join(feature_run.out, lce.WEIGHTS_NAME))
    config = json.loads(meta["training_config"])
    assert config == feature_run.cfg.as_dict()
    assert config["TRAIN_TEXT_ENCODER"] is True and config["LORA_RANK"] == R["RANK"] and config["LORA_ALPHA"] == R["ALPHA"]
    assert config["LORAPLUS_LR_RATIO"] == R["RATIO"] and config["TEXT_ENCODER_LEARNING_RATE"] == R["TE_LR"]
    with open(os.path.join(feature_run.out, "training_config.json")) as f:
        assert json.load(f) == config


# The key sets of the two files of an SD1.x run with UNet + text-encoder LoRA on the tiny model, written
# by the script before the one-story redesign (commit 2b46bfa) and after it: the same keys, the same
# lora_adapter_metadata (sha256 of the sorted key names, newline-joined).
PINNED_KEYS = {lce.WEIGHTS_NAME: (176, "5c9c08e6e5c03cfc"), WEBUI_NAME: (264, "2774005d86c56b8e")}


@pytest.mark.parametrize("name", [lce.WEIGHTS_NAME, WEBUI_NAME])
def test_file_keys_are_pinned(feature_run, name):
    import hashlib

    keys = sorted(read_safetensors(os.path.join(feature_run.out, name))[0])
    assert (len(keys), hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]) == PINNED_KEYS[name]


def test_adapter_metadata_is_what_diffusers_needs_to_rebuild_each_adapter(feature_run):
    _, meta = read_safetensors(os.path.join(feature_run.out, lce.WEIGHTS_NAME))
    assert set(meta) == {"format", "lora_adapter_metadata", "training_config"} and meta["format"] == "pt"
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert meta["lora_adapter_metadata"] == json.dumps(adapter, sort_keys=True)  # one line, keys sorted
    for part, targets in (("unet", lce.TARGET_MODULES), ("text_encoder", lce.TEXT_ENCODER_TARGET_MODULES)):
        assert {k: adapter[f"{part}.{k}"] for k in ("r", "lora_alpha", "lora_dropout", "init_lora_weights", "use_dora",
                                                      "use_rslora", "peft_type")} == dict(
            r=R["RANK"], lora_alpha=R["ALPHA"], lora_dropout=0.0, init_lora_weights="gaussian", use_dora=False,
            use_rslora=False, peft_type="LORA")
        assert adapter[f"{part}.target_modules"] == sorted(targets)
    assert {k.split(".", 1)[0] for k in adapter} == {"unet", "text_encoder"}


def test_webui_file_ss_metadata_matches_the_run(feature_run, tiny_model_dir, tiny_data_dir):
    import diffusers
    import peft

    cfg = feature_run.cfg
    _, meta = read_safetensors(os.path.join(feature_run.out, WEBUI_NAME))
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_dim"] == str(R["RANK"]) and float(meta["ss_network_alpha"]) == R["ALPHA"]
    # a local model folder is named by its folder name (sd-scripts' convention), a hub id as it is
    assert meta["ss_sd_model_name"] == os.path.basename(tiny_model_dir)
    assert meta["ss_seed"] == str(cfg.SEED) == "42"
    assert float(meta["ss_learning_rate"]) == float(meta["ss_unet_lr"]) == R["LR"]
    assert float(meta["ss_text_encoder_lr"]) == R["TE_LR"]
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.resolution"] == "64x64"
    assert meta["ss_steps"] == meta["ss_max_train_steps"] == str(R["STEPS"])
    assert meta["ss_num_train_images"] == "8"
    assert json.loads(meta["ss_dataset_dirs"]) == {os.path.basename(tiny_data_dir): {"n_repeats": 1, "img_count": 8}}
    assert meta["ss_lr_scheduler"] == "cosine" and meta["ss_lr_warmup_steps"] == str(R["WARMUP"])
    assert meta["ss_batch_size_per_device"] == "4" and meta["ss_gradient_accumulation_steps"] == "1"
    assert meta["ss_mixed_precision"] == "no" and meta["ss_output_name"] == "my_lora"
    args = json.loads(meta["ss_network_args"])
    assert args["train_text_encoder"] is True and args["loraplus_lr_ratio"] == R["RATIO"]
    assert sorted(args["text_encoder_target_modules"]) == sorted(lce.TEXT_ENCODER_TARGET_MODULES)
    started, finished = float(meta["ss_training_started_at"]), float(meta["ss_training_finished_at"])
    assert feature_run.t0 - 1 <= started <= finished <= feature_run.t1 + 1  # within the run
    assert meta["modelspec.date"] == datetime.datetime.fromtimestamp(int(finished)).isoformat()
    version = meta["lora_complete_example_version"]  # the package versions the file was made with
    assert all(f"{m.__name__} {m.__version__}" in version for m in (diffusers, peft, torch))


# ----------------------------------------------------------------------------- SAVE_DTYPE=fp16
@pytest.mark.parametrize("name", [lce.WEIGHTS_NAME, WEBUI_NAME])
def test_fp16_files_are_the_fp32_files_rounded_once_in_half_the_bytes(two_loras, rerun_of_first_lora, name):
    """The first small LoRA's run again with SAVE_DTYPE=fp16 (conftest.rerun_of_first_lora): the same
    training, so its files are the fp32 files rounded once."""
    fp32_path = os.path.join(two_loras["my_lora_model"].out, name)
    fp16, fp32 = lora_weights(rerun_of_first_lora.out, name), lora_weights(os.path.dirname(fp32_path), name)
    assert fp16.keys() == fp32.keys() and maxdiff(fp32[next(iter(fp32))], 0) > 0
    for k, v in fp32.items():
        assert v.dtype == torch.float32 and fp16[k].dtype == torch.float16 and torch.equal(fp16[k], v.half()), k
    assert 2 * tensor_bytes(os.path.join(rerun_of_first_lora.out, name)) == tensor_bytes(fp32_path)


def test_fp16_files_load_to_the_fp32_model_within_rounding(two_loras, rerun_of_first_lora, tiny_model_dir):
    assert "reload check:" in rerun_of_first_lora.log  # the run's own check passed at fp16's tolerance
    y32 = pipe_outputs(fresh_pipe(tiny_model_dir, two_loras["my_lora_model"].out))[0]
    effect = maxdiff(y32, pipe_outputs(fresh_pipe(tiny_model_dir))[0])
    assert effect > 1e-3
    for name in (lce.WEIGHTS_NAME, WEBUI_NAME):
        d = maxdiff(pipe_outputs(fresh_pipe(tiny_model_dir, rerun_of_first_lora.out, weight_name=name))[0], y32)
        assert d <= 2e-3 * max(1.0, y32.abs().max().item()) and d <= 0.05 * effect, (name, d, effect)


def test_resume_from_latest_with_no_complete_checkpoint_starts_a_new_run(rerun_of_first_lora):
    """RESUME_FROM=latest in a folder holding only a half-written checkpoint-5/: a new run, said in one
    line (and the same training as without RESUME_FROM: the fp16 files above are the first LoRA's)."""
    assert f"RESUME_FROM=latest: no checkpoint in {rerun_of_first_lora.out} yet, starting a new run" in rerun_of_first_lora.log
    assert "resumed from" not in rerun_of_first_lora.log


# ----------------------------------------------------------------------------- two LoRAs combined
@pytest.fixture(scope="module")
def combined(two_loras, tiny_model_dir):
    a, b = two_loras["my_lora_model"].out, two_loras["my_second_lora_model"].out
    pipe = fresh_pipe(tiny_model_dir)
    with capture_library_messages() as messages_a:
        pipe.load_lora_weights(a, adapter_name="a")
    with capture_library_messages() as messages_b:
        pipe.load_lora_weights(b, adapter_name="b")
    return dict(pipe=pipe, files={"a": a, "b": b}, messages=(messages_a, messages_b),
                only_a=pipe_outputs(fresh_pipe(tiny_model_dir, a))[0], only_b=pipe_outputs(fresh_pipe(tiny_model_dir, b))[0])


def test_adapter_weights_one_zero_reproduce_each_adapter_alone(combined):
    messages_a, messages_b = combined["messages"]
    assert key_complaints(messages_a) == [], messages_a
    # diffusers 0.42, loading a second adapter, lists the FIRST adapter's keys (".a.weight") as
    # "missing" from the second file: harmless (the outputs below prove it); nothing of "b" may be
    complaints_b = "\n".join(key_complaints(messages_b))
    assert ".b.weight" not in complaints_b and "lora_A.b" not in complaints_b, complaints_b
    for weights, alone in (([1.0, 0.0], combined["only_a"]), ([0.0, 1.0], combined["only_b"])):
        combined["pipe"].set_adapters(["a", "b"], adapter_weights=weights)
        assert_close(pipe_outputs(combined["pipe"])[0], alone, what=f"weights {weights} vs one adapter alone")


def test_blend_is_the_weighted_sum_of_the_two_updates(combined):
    from peft.tuners.lora import LoraLayer

    from lora_tools.spectrum import lora_updates

    pipe = combined["pipe"]
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.3])
    y = pipe_outputs(pipe)[0]
    assert maxdiff(y, combined["only_a"]) > 100 * tol(y) and maxdiff(y, combined["only_b"]) > 100 * tol(y)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"  # a Linear 32 -> 16
    module = pipe.unet.get_submodule(name)
    assert isinstance(module, LoraLayer) and {"a", "b"} <= set(module.lora_A)
    deltas = {}
    for adapter, folder in combined["files"].items():
        tensors, meta = read_safetensors(os.path.join(folder, lce.WEIGHTS_NAME))
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
    assert_close(lora_updates(pipe.unet, "a")[name] + lora_updates(pipe.unet, "b")[name], blend, rel=1e-6, what="ΔW_a + ΔW_b")


# ----------------------------------------------------------------------------- the merged pipeline
def test_merged_pipeline_equals_base_plus_lora_for_unet_and_text_encoder(feature_run, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    merged = StableDiffusionPipeline.from_pretrained(os.path.join(feature_run.out, "merged_pipeline"), safety_checker=None)
    assert lora_layer_names(merged.unet) == lora_layer_names(merged.text_encoder) == []
    assert not any("lora" in n for m in (merged.unet, merged.text_encoder) for n, _ in m.named_parameters())
    y_m, h_m = pipe_outputs(merged)
    y_l, h_l = pipe_outputs(fresh_pipe(tiny_model_dir, feature_run.out))
    assert_close(y_m, y_l, what="merged UNet vs base + load_lora_weights")
    assert_close(h_m, h_l, what="merged text encoder vs base + load_lora_weights")
    y0, h0 = pipe_outputs(fresh_pipe(tiny_model_dir))
    assert maxdiff(y_l, y0) > 100 * tol(y0) and maxdiff(h_l, h0) > 100 * tol(h0)


# ----------------------------------------------------------------------------- DoRA and rsLoRA
@pytest.fixture(scope="module")
def dora_run(tmp_path_factory, tiny_args):
    return run_main(tiny_args(f"--OUTPUT_DIR={tmp_path_factory.mktemp('dora') / 'out'}", "--MAX_TRAIN_STEPS=3",
                              "--USE_DORA=True", "--LEARNING_RATE=1e-2", "--LORA_ALPHA=8"))


@pytest.fixture(scope="module")
def rslora_run(tmp_path_factory, tiny_args):
    return run_main(tiny_args(f"--OUTPUT_DIR={tmp_path_factory.mktemp('rslora') / 'out'}", "--MAX_TRAIN_STEPS=3",
                              "--USE_RSLORA=True", "--LEARNING_RATE=1e-2", "--LORA_ALPHA=8"))


def test_dora_file_holds_trained_magnitudes_and_reloads(dora_run, tiny_model_dir):
    from diffusers import UNet2DConditionModel

    tensors, meta = read_safetensors(os.path.join(dora_run.out, lce.WEIGHTS_NAME))
    assert json.loads(meta["lora_adapter_metadata"])["unet.use_dora"] is True
    magnitudes = {k[5:].rsplit(".", 1)[0]: v for k, v in tensors.items() if k.endswith(".lora_magnitude_vector")}
    ref = reference_unet(tiny_model_dir, dora_run.out, dora_run.cfg)
    assert len(magnitudes) == len(lora_layer_names(ref)) > 0
    # DoRA starts each magnitude at the row norms ‖W0‖: a trained one has moved away from them
    plain = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    moved = [maxdiff(v, plain.get_submodule(name).weight.norm(dim=1)) > 1e-4 for name, v in magnitudes.items()]
    assert sum(moved) >= len(moved) - 2, sum(moved)  # (the mid block's single-token to_q / to_k may not move)
    y = pipe_outputs(fresh_pipe(tiny_model_dir, dora_run.out))[0]
    y_ref = outputs(ref)[0]
    assert_close(y, y_ref, what="DoRA: diffusers' reload vs PEFT from the run's settings")
    assert maxdiff(y_ref, pipe_outputs(fresh_pipe(tiny_model_dir))[0]) > 1e-3
    assert not os.path.exists(os.path.join(dora_run.out, WEBUI_NAME))  # no WebUI file, no spectrum, and the notes say why
    assert not os.path.exists(os.path.join(dora_run.out, "rank_spectrum.png"))
    assert "note: USE_DORA=True — no WebUI/ComfyUI file written" in dora_run.log
    assert "note: USE_DORA=True — no rank spectrum" in dora_run.log


def test_rslora_scales_by_alpha_over_sqrt_r_and_both_files_reload(rslora_run, tiny_model_dir):
    y_ref = outputs(reference_unet(tiny_model_dir, rslora_run.out, rslora_run.cfg))[0]
    assert maxdiff(y_ref, pipe_outputs(fresh_pipe(tiny_model_dir))[0]) > 1e-3
    for name in (lce.WEIGHTS_NAME, WEBUI_NAME):
        pipe = fresh_pipe(tiny_model_dir, rslora_run.out, weight_name=name)
        scales = {m.scaling[a] for m in pipe.unet.modules() if hasattr(m, "scaling") for a in m.scaling}
        assert scales == {8 / math.sqrt(4)}  # α/√r = 4, not α/r = 2
        assert_close(pipe_outputs(pipe)[0], y_ref, what=f"rsLoRA reload of {name}")
    alphas = {v.item() for k, v in lora_weights(rslora_run.out, WEBUI_NAME).items() if k.endswith(".alpha")}
    assert alphas == {8 * math.sqrt(4)}  # kohya files mean α/r: α' = α·√r
