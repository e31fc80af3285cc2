"""SDXL through the same script: the family found from the model folder, the counts of the real SDXL base
1.0 architecture, the conditioning as StableDiffusionXLPipeline makes it (two encoders' penultimate
states, the pooled embedding, each picture's size and crop), cached = uncached, the files with three
prefixes reloading exactly in plain diffusers (α != r, both text encoders), the WebUI/ComfyUI file's
names and tags, exact resume, the merged pipeline, and DreamBooth with a token in both embedding tables.
All on a tiny SDXL-shaped pipeline (tests/tiny.py) built offline in diffusers layout."""
import hashlib
import json
import os

import pytest
import torch

import lora_complete_example as lce
import lora_dreambooth_example as ldb
from conftest import (capture_library_messages, collate_items, key_complaints, lora_weights,
                      maxdiff, pixel_diff, read_safetensors, run_main, shared_run)
from lora_tools.config import UserError
from lora_tools.family import SD1, SDXL, detect
from tiny import make_shape_image

RANK, ALPHA = 4, 8
pytestmark = pytest.mark.xdist_group("sdxl")  # one worker builds the tiny SDXL model and its runs


def xl_args(xl_model, tiny_data_dir, *extra):
    args = {a.split("=", 1)[0]: a for a in [
        f"--MODEL_ID={xl_model}", f"--DATA_DIR={tiny_data_dir}", "--MIXED_PRECISION=no", "--BATCH_SIZE=4",
        "--GRADIENT_ACCUMULATION_STEPS=1", "--LEARNING_RATE=1e-2", "--NUM_INFERENCE_STEPS=2", "--NUM_VALIDATION_SEEDS=1",
        "--VALIDATION_PROMPTS=a red circle on a blue background", *extra]}
    return list(args.values())


@pytest.fixture(scope="module")
def xl_run(shared_root, xl_model, tiny_data_dir):
    """The SDXL run: RESOLUTION left at None, LoRA on the UNet and both text encoders with α != r,
    6 steps with a checkpoint at 3, rsLoRA + LoRA+ + Min-SNR, and the merged pipeline."""
    return shared_run(shared_root, "xl_run", lambda out: xl_args(
        xl_model, tiny_data_dir, f"--OUTPUT_DIR={out}", "--TRAIN_TEXT_ENCODER=True", f"--LORA_RANK={RANK}",
        f"--LORA_ALPHA={ALPHA}", "--MAX_TRAIN_STEPS=6", "--CHECKPOINTING_STEPS=3", "--LOG_EVERY=1", "--SNR_GAMMA=5.0",
        "--USE_RSLORA=True",
        "--LORAPLUS_LR_RATIO=4", "--SAVE_MERGED_MODEL=True"))


def xl_pipe(model, lora_dir=None, **kwargs):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, **kwargs)
    return pipe


def draw(pipe, cfg, prompt=None):
    return pipe(prompt or cfg.VALIDATION_PROMPTS[0], height=cfg.RESOLUTION, width=cfg.RESOLUTION,
                num_inference_steps=cfg.NUM_INFERENCE_STEPS, guidance_scale=cfg.GUIDANCE_SCALE,
                generator=torch.Generator().manual_seed(cfg.SEED)).images[0]


# ----------------------------------------------------------------------------- the real architecture
def test_counts_of_the_real_sdxl_base_architecture():
    from lora_tools.sdxl import SDXL_UNET_PARAMS, sdxl_text_encoders, sdxl_unet

    cfg = lce.resolve_config([f"--LORA_RANK={RANK}", f"--LORA_ALPHA={RANK}"])
    unet = sdxl_unet("meta")
    assert lce.count_params(unet) == SDXL_UNET_PARAMS == 2_567_463_684
    lce.freeze(unet)
    params = lce.add_lora(unet, cfg, cfg.TARGET_MODULES)
    assert sum(p.numel() for p in params) == 5_806_080 and len(params) == 2 * 560  # 70 blocks x 2 attentions x 4
    counts = []
    for te in sdxl_text_encoders("meta"):
        lce.freeze(te)
        te_params = lce.add_lora(te, cfg, cfg.TEXT_ENCODER_TARGET_MODULES, "TEXT_ENCODER_TARGET_MODULES")
        counts.append((sum(p.numel() for p in te_params), len(te_params) // 2))
    assert counts == [(294_912, 48), (1_310_720, 128)]  # CLIP-L: 12 layers x 4; bigG: 32 layers x 4


# ----------------------------------------------------------------------------- the family and the size
def test_the_family_is_read_from_the_model_folder(xl_model, tiny_model_dir, tmp_path):
    assert detect(xl_model) is SDXL and detect(tiny_model_dir) is SD1
    # a folder without model_index.json: SDXL by its UNet ("text_time") and its second text encoder
    import shutil

    bare = shutil.copytree(xl_model, tmp_path / "bare")
    os.remove(bare / "model_index.json")
    assert detect(str(bare)) is SDXL
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match=r"is a FluxPipeline, which this script cannot train — it trains .*SDXL") as e:
        detect(str(other))
    assert "\n" not in str(e.value)


def test_resolution_none_is_the_models_own_size_and_a_small_one_is_said(xl_run, xl_model, tiny_data_dir, capsys):
    assert xl_run.cfg.RESOLUTION is None  # as given ...
    with open(os.path.join(xl_run.out, "training_config.json")) as f:
        assert json.load(f)["RESOLUTION"] == 64  # ... and as trained: the tiny model's 8 latents x 8
    assert "SDXL (StableDiffusionXLPipeline), 64 px" in xl_run.log and "well below" not in xl_run.log
    cfg, *_ = lce.start(lce.resolve_config(xl_args(xl_model, tiny_data_dir, "--RESOLUTION=40")))
    assert cfg.RESOLUTION == 40 and "RESOLUTION=40 is well below the 64 px this model was trained at" in capsys.readouterr().out


def test_under_fp16_the_vae_is_fp32_where_its_config_asks(xl_model, tiny_data_dir):
    cfg = lce.resolve_config(xl_args(xl_model, tiny_data_dir))
    assert lce.vae_dtype(cfg, torch.float16) == torch.float32  # SDXL's VAE: force_upcast
    assert lce.vae_dtype(cfg, torch.bfloat16) == torch.bfloat16
    assert lce.vae_dtype(lce.resolve_config(xl_args(xl_model, tiny_data_dir, "--VAE_FP32=True")), torch.bfloat16) == torch.float32


# ----------------------------------------------------------------------------- the conditioning
@pytest.fixture(scope="module")
def xl_models(xl_model, tiny_data_dir):
    cfg = lce.resolve_config(xl_args(xl_model, tiny_data_dir, "--RESOLUTION=64"))
    sd = lce.load_models(cfg, SDXL, torch.float32)
    lce.freeze(sd.unet, sd.vae, *sd.text_encoders)
    return cfg, sd


def test_the_prompt_is_encoded_as_the_sdxl_pipeline_encodes_it(xl_models, xl_model):
    cfg, sd = xl_models
    prompts = ["a red circle on a blue background", "a green square"]
    ids = lce.tokenize(sd.tokenizers, prompts)
    assert ids.shape == (2, 2, 77) and ids[1, 1, -1].item() == sd.tokenizers[1].convert_tokens_to_ids("!")  # pads with "!"
    with torch.no_grad():
        ours = lce.encode_prompt(SDXL, sd.text_encoders, ids)
        theirs, _, pooled, _ = xl_pipe(xl_model).encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert ours["encoder_hidden_states"].shape == (2, 77, 64) and ours["text_embeds"].shape == (2, 32)
    assert torch.equal(ours["encoder_hidden_states"], theirs) and torch.equal(ours["text_embeds"], pooled)


def test_size_and_crop_of_a_picture_and_of_its_mirror_image(xl_models, tmp_path):
    """A 97 x 64 picture at 64 px: nothing to resize, the centre crop starts 16 px in (33 / 2 rounded to
    even), and in the mirror image 17 px in: (original h, w, crop top, left, target h, w)."""
    cfg, sd = xl_models
    make_shape_image("red", "circle", "blue", size=(97, 64)).save(tmp_path / "wide.png")
    ds = lce.CaptionedImages([str(tmp_path / "wide.png")], lce.tokenize(sd.tokenizers, ["a red circle"]), cfg)
    assert ds[(0, False, 0)]["time_ids"].tolist() == [64, 97, 0, 16, 64, 64]
    assert ds[(0, True, 0)]["time_ids"].tolist() == [64, 97, 0, 17, 64, 64]
    cached = lce.cache_latents(ds, sd, cfg, show_progress=False)
    assert cached.time_ids[0].tolist() == [[64, 97, 0, 16, 64, 64], [64, 97, 0, 17, 64, 64]]


def test_cached_and_uncached_paths_give_the_same_loss(xl_models):
    cfg, sd = xl_models
    images, captions = lce.load_captioned_images(cfg, show_progress=False)
    ds = lce.CaptionedImages(images, lce.tokenize(sd.tokenizers, captions), cfg)
    cached = lce.cache_latents(ds, sd, cfg, show_progress=False)
    picks = [(5, True, 11), (0, False, 12), (3, True, 13)]
    batch = collate_items(cached, picks)
    assert set(batch) >= {"encoder_hidden_states", "text_embeds", "time_ids"} and "input_ids" not in batch
    with torch.no_grad():
        torch.testing.assert_close(lce.compute_loss(batch, sd), lce.compute_loss(collate_items(ds, picks), sd),
                                   rtol=1e-5, atol=1e-7)
        moved = dict(batch, time_ids=batch["time_ids"] + torch.tensor([0, 0, 8, 8, 0, 0]))  # another crop
        assert (lce.compute_loss(moved, sd) - lce.compute_loss(batch, sd)).abs().max() > 1e-6  # the UNet reads it


def test_a_dropped_caption_is_sdxls_empty_prompt_zeros_cached_or_not(xl_models):
    """CAPTION_DROPOUT on SDXL: a dropped caption trains with zeros for both the hidden states and the pooled
    vector (what SDXL pipelines use for an empty prompt), on the cached and the per-step path alike."""
    cfg, sd = xl_models
    cfg = cfg.replace(CAPTION_DROPOUT=0.5)
    images, captions = lce.load_captioned_images(cfg, show_progress=False)
    ds = lce.CaptionedImages(images, lce.tokenize(sd.tokenizers, captions), cfg, lce.tokenize(sd.tokenizers, [""])[0])
    cached = lce.cache_latents(ds, sd, cfg, show_progress=False)
    seeds = range(100, 140)
    dropped = [s for s in seeds if lce.caption_dropped(s, 0.5)][:2]
    kept = [s for s in seeds if not lce.caption_dropped(s, 0.5)][:2]
    picks = [(1, False, dropped[0]), (4, True, kept[0]), (6, False, dropped[1]), (2, False, kept[1])]
    batch = collate_items(cached, picks)
    assert batch["caption_dropped"].tolist() == [True, False, True, False]
    for k in ("encoder_hidden_states", "text_embeds"):
        assert batch[k][[0, 2]].abs().max() == 0 and batch[k][[1, 3]].abs().max() > 0
    with torch.no_grad():
        loss = lce.compute_loss(batch, sd)
        torch.testing.assert_close(loss, lce.compute_loss(collate_items(ds, picks), sd), rtol=1e-5, atol=1e-7)
        undropped = collate_items(lce.CachedLatents(cached.mean, cached.std, cached.time_ids,
                                                    {k: v[:-1] for k, v in cached.text.items()}, None), picks)
        change = (lce.compute_loss(undropped, sd) - loss).abs()
    assert change[[0, 2]].min() > 1e-6 and change[[1, 3]].max() == 0  # only the dropped ones trained otherwise


def test_a_vae_that_gives_nan_latents_is_one_line_at_caching(xl_model, tiny_data_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(xl_model, tmp_path / "nan-vae")
    path = broken / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(path)
    weights["encoder.conv_in.bias"] = torch.full_like(weights["encoder.conv_in.bias"], float("nan"))
    save_file(weights, path)
    with pytest.raises(UserError, match="NaN/inf latents .* --MIXED_PRECISION=bf16 or --VAE_FP32=True") as e:
        lce.main(xl_args(str(broken), tiny_data_dir, f"--OUTPUT_DIR={tmp_path / 'out'}", "--MAX_TRAIN_STEPS=1"))
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- the files
def test_the_diffusers_file_has_three_prefixes_and_each_ones_alpha(xl_run):
    tensors, meta = read_safetensors(os.path.join(xl_run.out, lce.WEIGHTS_NAME))
    assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder", "text_encoder_2"}
    assert len([k for k in tensors if k.startswith("text_encoder.")]) == 2 * 2 * 4  # 2 layers x 4 projections
    adapter = json.loads(meta["lora_adapter_metadata"])
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert adapter[f"{part}.r"] == RANK and adapter[f"{part}.lora_alpha"] == ALPHA and adapter[f"{part}.use_rslora"]


def test_plain_diffusers_renders_the_test_image_from_either_file(xl_run, xl_model):
    """StableDiffusionXLPipeline.load_lora_weights, as the printed recipe says: the diffusers file (α/√r
    from its metadata, for all three models) and the WebUI/ComfyUI file give test_generation.png."""
    assert "from diffusers import StableDiffusionXLPipeline" in xl_run.log
    written = os.path.join(xl_run.out, "test_generation.png")
    with capture_library_messages() as messages:
        pipe = xl_pipe(xl_model, xl_run.out)
    assert key_complaints(messages) == [], messages
    assert pixel_diff(written, draw(pipe, xl_run.cfg)) <= 1
    scale = ALPHA / RANK ** 0.5
    for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        assert {round(m.scaling[a], 6) for m in model.modules() if hasattr(m, "scaling") for a in m.scaling} == {round(scale, 6)}
    assert pixel_diff(written, draw(xl_pipe(xl_model, xl_run.out, weight_name="my_lora.safetensors"), xl_run.cfg)) <= 1
    assert pixel_diff(written, draw(xl_pipe(xl_model), xl_run.cfg)) > 1  # without the LoRA, another picture


# The WebUI/ComfyUI file's names (sha256 of the sorted names, newline-joined): diffusers' UNet module names
# after lora_unet_, CLIP-L's after lora_te1_text_model_, bigG's after lora_te2_text_model_.
PINNED_WEBUI = (312, "efa8d263aae5fab2")


def test_the_webui_file_names_and_tags_are_sdxls(xl_run):
    tensors, meta = read_safetensors(os.path.join(xl_run.out, "my_lora.safetensors"))
    names = sorted(tensors)
    assert {n.split("_")[0] + "_" + n.split("_")[1] for n in names} == {"lora_unet", "lora_te1", "lora_te2"}
    assert all(n.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_",
                             "lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_")) for n in names)
    assert (len(names), hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]) == PINNED_WEBUI
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora" and meta["ss_resolution"] == "(64, 64)"
    alphas = {round(tensors[n].item(), 4) for n in names if n.endswith(".alpha")}
    assert alphas == {round(ALPHA * RANK ** 0.5, 4)}  # rsLoRA, as a kohya file's α/r: α·√r


def test_a_checkpoint_resumes_exactly(xl_run, tmp_path):
    argv = [a for a in xl_run.argv if not a.startswith(("--OUTPUT_DIR=", "--SAVE_MERGED_MODEL="))]
    resumed = run_main(argv + [f"--OUTPUT_DIR={tmp_path / 'out'}", f"--RESUME_FROM={os.path.join(xl_run.out, 'checkpoint-3')}"])
    assert "resumed from" in resumed.log and "note:" not in resumed.log
    full, again = lora_weights(xl_run.out), lora_weights(resumed.out)
    at_3 = lora_weights(os.path.join(xl_run.out, "checkpoint-3"))
    assert max(maxdiff(full[k], at_3[k]) for k in full) > 1e-4  # steps 4-6 trained
    assert max(maxdiff(full[k], again[k]) for k in full) <= 1e-5


def test_the_merged_pipeline_is_an_sdxl_pipeline_with_the_lora_in_its_weights(xl_run, xl_model):
    from diffusers import StableDiffusionXLPipeline

    merged = StableDiffusionXLPipeline.from_pretrained(os.path.join(xl_run.out, "merged_pipeline"))
    merged.set_progress_bar_config(disable=True)
    assert pixel_diff(draw(merged, xl_run.cfg), os.path.join(xl_run.out, "test_generation.png")) <= 2


# ----------------------------------------------------------------------------- DreamBooth and a token in both tables
@pytest.fixture(scope="module")
def xl_dreambooth(xl_model, tiny_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("xl_dreambooth")
    return run_main(xl_args(xl_model, tiny_data_dir, f"--OUTPUT_DIR={root / 'out'}", "--BATCH_SIZE=2", "--MAX_TRAIN_STEPS=4",
                            "--INSTANCE_PROMPT=a <zwx> circle", "--CLASS_PROMPT=a circle", "--NEW_TOKEN=<zwx>",
                            "--NEW_TOKEN_INIT_WORD=circle", "--NUM_CLASS_IMAGES=3", "--EMBEDDING_LEARNING_RATE=1e-2",
                            "--VALIDATION_PROMPTS=a <zwx> circle on a red background", "--USE_DORA=True"), ldb)


def test_pivotal_tuning_on_sdxl_trains_the_token_in_both_tables_and_plain_diffusers_loads_it(xl_dreambooth, xl_model):
    """DreamBooth with prior preservation, a new token and DoRA on SDXL: plain diffusers redraws its test image."""
    from safetensors.torch import load_file

    out = xl_dreambooth.out
    weights = lora_weights(out)
    assert any("lora_magnitude_vector" in k for k in weights)  # DoRA's magnitudes are in the file
    assert not os.path.exists(os.path.join(out, "my_lora.safetensors"))  # and no WebUI file (DoRA)
    emb = load_file(os.path.join(out, "my_lora_emb.safetensors"))
    assert sorted(emb) == ["clip_g", "clip_l"] and emb["clip_l"].shape == emb["clip_g"].shape == (2, 32)
    pipe = xl_pipe(xl_model, out)
    for name, tok, te in (("clip_l", pipe.tokenizer, pipe.text_encoder), ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2)):
        pipe.load_textual_inversion(emb[name], token="<zwx>", tokenizer=tok, text_encoder=te)  # as the recipe says
    assert "pipe.load_textual_inversion(emb['clip_g'], token='<zwx>', tokenizer=pipe.tokenizer_2" in xl_dreambooth.log
    assert pixel_diff(draw(pipe, xl_dreambooth.cfg), os.path.join(out, "test_generation.png")) <= 1
    # the token matters in both encoders: its rows moved from their start (the init word's embedding)
    start = xl_pipe(xl_model)
    for name, tok, te in (("clip_l", start.tokenizer, start.text_encoder), ("clip_g", start.tokenizer_2, start.text_encoder_2)):
        init = te.get_input_embeddings().weight[tok("circle", add_special_tokens=False).input_ids].mean(0)
        assert maxdiff(emb[name], init.expand(2, -1)) > 1e-3, name
