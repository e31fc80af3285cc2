"""lora_dreambooth_example.py: DreamBooth-LoRA with prior preservation, and pivotal tuning (a new
token learned with the LoRA).

Measured on the tiny random model: the loss weights give subject mean + λ·class mean; class pictures
are drawn once and reused; pivotal tuning changes the new token's rows and the LoRA and nothing else;
plain diffusers (load_lora_weights + load_textual_inversion) reproduces the trained text encoder's
output and test_generation.png; an interrupted + resumed run equals an uninterrupted one. On the
pretrained shapes model (demo_base/, skipped when it is missing): the subject is learned, and prior
preservation keeps the class prompt's pictures closer to the base model's own.
"""
import os
import re

import pytest
import torch
from conftest import collate_items, lce, lora_weights, maxdiff, pixel_diff, png, read_safetensors, render, run_main

import lora_dreambooth_example as ldb
from lora_tools.config import UserError
from lora_tools.dreambooth import PairedImages, expand_token

TOKEN, N_VECTORS = "<zwx>", 2
INSTANCE, CLASS = f"a {TOKEN} circle", "a circle"
EMB_NAME = "my_lora_emb.safetensors"  # OUTPUT_NAME's default + _emb.safetensors


def dreambooth_args(tiny_args, *extra):
    return tiny_args(f"--INSTANCE_PROMPT={INSTANCE}", f"--CLASS_PROMPT={CLASS}", f"--NEW_TOKEN={TOKEN}",
                     f"--NUM_NEW_TOKEN_VECTORS={N_VECTORS}", "--NEW_TOKEN_INIT_WORD=circle", "--NUM_CLASS_IMAGES=5",
                     "--EMBEDDING_LEARNING_RATE=1e-2", f"--VALIDATION_PROMPTS={INSTANCE} on a red background", *extra)


def make_db_cfg(tiny_args, *extra):
    return ldb.resolve_config(tiny_args(*extra))


# ----------------------------------------------------------------------------- the prior-preservation loss
class Examples(torch.utils.data.Dataset):
    """Cached-looking examples with latents and text of their own."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.mean, self.text = torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 77, 32, generator=g)

    def __len__(self):
        return len(self.mean)

    def __getitem__(self, item):
        i, flip, seed = item
        return {"latent_mean": self.mean[i], "latent_std": 0.1 * torch.ones(4, 8, 8), "encoder_hidden_states": self.text[i],
                "seed": seed, "loss_weight": torch.tensor(1.0)}


def test_prior_loss_is_subject_mean_plus_lambda_class_mean(tiny_args, load_tiny):
    """Ruiz et al. Eq. (2) through PairedImages and the training loop's reduction (the mean over a step's
    examples of weight x loss): equal to the subject mean + λ·class mean of the examples' own losses."""
    sd = load_tiny(make_db_cfg(tiny_args))
    lam = 0.7
    pairs = PairedImages(Examples(3, 0), Examples(5, 1), lam)
    batch = ldb.collate_pairs([pairs[(i, False, 10 * i)] for i in range(3)])  # 3 subject, then 3 class examples
    with torch.no_grad():
        losses = lce.compute_loss(batch, sd)
    assert len(batch["seed"]) == 6 and len(set(batch["seed"])) == 6  # the class example draws its own noise
    reduced = (losses * batch["loss_weight"]).sum() / len(batch["seed"])  # what train() takes the gradient of
    assert reduced.item() == pytest.approx((losses[:3].mean() + lam * losses[3:].mean()).item(), rel=1e-6)


# ----------------------------------------------------------------------------- pivotal tuning, measured directly
@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_pivotal_tuning_trains_only_the_new_rows_and_the_lora(tiny_args, load_tiny, tiny_model_dir, tmp_path, train_text_encoder):
    """Three optimizer steps as the script takes them (with and without the text encoder's LoRA); then
    every tensor of the three models is compared with its value before: only the LoRA tensors and the
    new token's rows may differ. The files (the run's adapter files) loaded by plain diffusers give the
    trained text encoder's output."""
    from diffusers import StableDiffusionPipeline

    from lora_tools.dreambooth import save_embedding

    cfg = make_db_cfg(tiny_args, f"--NEW_TOKEN={TOKEN}", f"--NUM_NEW_TOKEN_VECTORS={N_VECTORS}", "--NEW_TOKEN_INIT_WORD=circle",
                      "--EMBEDDING_LEARNING_RATE=1e-2", f"--INSTANCE_PROMPT={INSTANCE}",
                      f"--TRAIN_TEXT_ENCODER={train_text_encoder}")
    sd = load_tiny(cfg)
    (tok,), (te,), vae, unet = sd.tokenizers, sd.text_encoders, sd.vae, sd.unet
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in (("te", te), ("unet", unet), ("vae", vae))}
    old_vocab = len(tok)
    lce.add_lora(unet, cfg, cfg.TARGET_MODULES)
    ids = ldb.add_new_token(tok, te, cfg)
    if train_text_encoder:  # as main() does: the text encoder's LoRA also holds the token's rows
        lce.add_lora(te, cfg, cfg.TEXT_ENCODER_TARGET_MODULES, "TEXT_ENCODER_TARGET_MODULES",
                     trainable_token_indices={"token_embedding": ids})
    assert ids == [old_vocab, old_vocab + 1] and tok.convert_ids_to_tokens(ids) == [TOKEN, f"{TOKEN}_1"]
    start = ldb.new_token_vectors(te).detach().clone()
    assert torch.equal(start[0], start[1])  # both start as the init word's embedding
    groups = lce.lora_param_groups([(unet, cfg.LEARNING_RATE), (te, cfg.LEARNING_RATE)], cfg)
    groups.append({"params": [ldb.new_token_vectors(te)], "lr": cfg.EMBEDDING_LEARNING_RATE, "weight_decay": 0.0})
    optimizer = lce.make_optimizer(groups, cfg, cuda=False)
    assert {g["lr"] for g in optimizer.param_groups} == {cfg.LEARNING_RATE, cfg.EMBEDDING_LEARNING_RATE}
    images = [os.path.join(cfg.DATA_DIR, f"{i:03d}.png") for i in range(4)]
    data = lce.CaptionedImages(images, lce.tokenize(sd.tokenizers, ldb.encoder_prompts(cfg, [INSTANCE] * 4)), cfg)
    unet.train()
    te.train()
    for step in range(3):
        batch = collate_items(data, [(i, False, 10 * step + i) for i in range(4)])
        lce.compute_loss(batch, sd).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    learned = ldb.new_token_vectors(te).detach()
    assert maxdiff(learned, start) > 1e-3  # the token moved
    changed = []
    for name, m in (("te", te), ("unet", unet), ("vae", vae)):
        for k, v in m.state_dict().items():
            if "lora_" in k or "trainable_tokens" in k:
                continue
            k0 = k.replace(".token_adapter", "").replace(".base_layer", "")  # the name before PEFT wrapped the layer
            if name == "te" and k0.endswith("token_embedding.weight"):
                # the frozen table: the old rows bit-identical, the new rows still at their start value
                assert torch.equal(v[:old_vocab], before["te"][k0]) and torch.equal(v[ids], start.to(v.dtype))
                continue
            if not torch.equal(v, before[name][k0]):
                changed.append(f"{name}.{k}")
    assert changed == []
    lora_moved = [n for n, p in unet.named_parameters() if "lora_B" in n and p.abs().max() > 0]
    assert lora_moved  # B starts at 0: it trained

    # the files through plain diffusers: the text encoder's output for a prompt holding the token
    save_embedding(str(tmp_path / EMB_NAME), {"emb_params": ldb.new_token_vectors(te)})
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    if train_text_encoder:
        lce.save_lora(str(tmp_path / lce.WEIGHTS_NAME), {"unet": unet, "text_encoder": te}, cfg)
        pipe.load_lora_weights(str(tmp_path))
    pipe.load_textual_inversion(str(tmp_path / EMB_NAME), token=TOKEN)
    prompt = f"a {TOKEN} circle on a red background"
    theirs_ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer), padding="max_length", max_length=77,
                                return_tensors="pt").input_ids
    ours_ids = lce.tokenize(sd.tokenizers, ldb.encoder_prompts(cfg, [prompt]))
    assert torch.equal(theirs_ids, ours_ids[:, 0])
    te.eval()
    with torch.no_grad():
        ours, theirs = te(ours_ids[:, 0])[0], pipe.text_encoder(theirs_ids)[0]
        plain = te(lce.tokenize(sd.tokenizers, ["a circle on a red background"])[:, 0])[0]
    assert maxdiff(ours, theirs) <= 1e-6
    assert maxdiff(ours, plain) > 1e-3  # (the prompt's output does depend on the token)


# ----------------------------------------------------------------------------- whole runs on the tiny model
@pytest.fixture(scope="module")
def dreambooth_runs(tmp_path_factory, tiny_args):
    """A: prior preservation + pivotal tuning, 6 steps, a checkpoint every 2 (BATCH_SIZE 3, accumulation 2:
    step 4 is mid-epoch), validation pictures at step 4, the merged pipeline. B: A resumed from
    checkpoint-4 in another folder, with A's class pictures."""
    root = tmp_path_factory.mktemp("dreambooth")
    argv = dreambooth_args(tiny_args, "--BATCH_SIZE=3", "--GRADIENT_ACCUMULATION_STEPS=2", "--MAX_TRAIN_STEPS=6",
                           "--CHECKPOINTING_STEPS=2", "--LOG_EVERY=1", f"--CLASS_DATA_DIR={root / 'class'}", "--SAVE_MERGED_MODEL=True",
                           "--VALIDATION_STEPS=4")
    a = run_main(argv + [f"--OUTPUT_DIR={root / 'A'}"], ldb)
    class_files = {f: os.path.getmtime(os.path.join(root, "class", f)) for f in os.listdir(root / "class")}
    b = run_main(argv + [f"--OUTPUT_DIR={root / 'B'}", f"--RESUME_FROM={os.path.join(a.out, 'checkpoint-4')}"], ldb)
    return dict(a=a, b=b, root=root, class_files=class_files)


def test_class_images_are_drawn_once_then_reused(dreambooth_runs):
    a, b, root = dreambooth_runs["a"], dreambooth_runs["b"], dreambooth_runs["root"]
    assert re.search(r"drawing 5 class image\(s\) of 'a circle'", a.log), a.log[-3000:]
    assert "reusing 5 class image(s)" in b.log and "drawing" not in b.log
    assert {f: os.path.getmtime(os.path.join(root, "class", f)) for f in os.listdir(root / "class")} == dreambooth_runs["class_files"]
    assert len(dreambooth_runs["class_files"]) == 5


def test_files_hold_the_lora_and_the_token_apart(dreambooth_runs):
    out = dreambooth_runs["a"].out
    lora, meta = read_safetensors(os.path.join(out, lce.WEIGHTS_NAME))
    assert lora and not [k for k in lora if "token" in k] and "trainable_token" not in meta["lora_adapter_metadata"]
    emb, _ = read_safetensors(os.path.join(out, EMB_NAME))
    assert list(emb) == ["emb_params"] and emb["emb_params"].shape == (N_VECTORS, 32)
    assert "only latents are cached" in dreambooth_runs["a"].log


def test_validation_pictures_show_the_model_and_its_token_at_their_step(dreambooth_runs, tiny_model_dir):
    """validation/step-000004.png: the model being trained at step 4 = checkpoint-4's LoRA and embedding,
    rendered by plain diffusers (load_lora_weights + load_textual_inversion)."""
    from diffusers import StableDiffusionPipeline

    from lora_tools.pictures import image_grid

    a = dreambooth_runs["a"]
    assert os.listdir(os.path.join(a.out, "validation")) == ["step-000004.png"]
    ckpt = os.path.join(a.out, "checkpoint-4")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(ckpt)
    pipe.load_textual_inversion(os.path.join(ckpt, EMB_NAME), token=TOKEN)
    prompts, seeds = list(a.cfg.VALIDATION_PROMPTS), [a.cfg.SEED]
    expected = image_grid([render(pipe, a.cfg, p, s) for p in prompts for s in seeds], rows=len(prompts),
                          labels=[f"seed {s}" for s in seeds], row_labels=prompts)
    assert pixel_diff(os.path.join(a.out, "validation", "step-000004.png"), expected) <= 1
    # and the token matters in them: the same pictures without the embedding differ
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(ckpt)
    without = image_grid([render(pipe, a.cfg, p, s) for p in prompts for s in seeds], rows=len(prompts),
                         labels=[f"seed {s}" for s in seeds], row_labels=prompts)
    assert pixel_diff(expected, without) > 1


def test_plain_diffusers_reproduces_test_generation(dreambooth_runs, tiny_model_dir):
    """The printed recipe's lines: from_pretrained + load_lora_weights + load_textual_inversion."""
    from diffusers import StableDiffusionPipeline

    a = dreambooth_runs["a"]
    emb_path = os.path.join(a.out, EMB_NAME)
    assert f"pipe.load_textual_inversion({emb_path!r}, token={TOKEN!r})" in a.log
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(a.out)
    pipe.load_textual_inversion(emb_path, token=TOKEN)
    assert pixel_diff(render(pipe, a.cfg), os.path.join(a.out, "test_generation.png")) == 0
    # comparison.png: subject prompt, class prompt and the validation prompt, without and with the LoRA
    assert png(os.path.join(a.out, "comparison.png")).shape[1] > png(os.path.join(a.out, "test_generation.png")).shape[1] * 3


def test_merged_pipeline_holds_the_token(dreambooth_runs, tiny_model_dir):
    """SAVE_MERGED_MODEL: LoRA fused, and the token in the saved tokenizer and text encoder."""
    from diffusers import StableDiffusionPipeline

    a = dreambooth_runs["a"]
    merged = StableDiffusionPipeline.from_pretrained(os.path.join(a.out, "merged_pipeline"), safety_checker=None)
    loaded = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    loaded.load_lora_weights(a.out)
    loaded.load_textual_inversion(os.path.join(a.out, EMB_NAME), token=TOKEN)
    prompt = f"a {TOKEN} circle on a red background"
    with torch.no_grad():
        h = [p.text_encoder(p.tokenizer(p.maybe_convert_prompt(prompt, p.tokenizer), padding="max_length", max_length=77,
                                        return_tensors="pt").input_ids)[0] for p in (merged, loaded)]
    assert merged.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"]) == [514, 515] and maxdiff(*h) <= 1e-6


def test_resume_with_a_new_token_is_exact(dreambooth_runs):
    a, b = dreambooth_runs["a"], dreambooth_runs["b"]
    assert re.search(r"resumed from .*checkpoint-4 at step 4", b.log), b.log[-2000:]
    assert os.path.isfile(os.path.join(a.out, "checkpoint-4", EMB_NAME))
    full, resumed = lora_weights(a.out), lora_weights(b.out)
    assert full.keys() == resumed.keys() and max(maxdiff(full[k], resumed[k]) for k in full) <= 1e-6
    emb_a, emb_b = (read_safetensors(os.path.join(r.out, EMB_NAME))[0]["emb_params"] for r in (a, b))
    emb_4 = read_safetensors(os.path.join(a.out, "checkpoint-4", EMB_NAME))[0]["emb_params"]
    assert maxdiff(emb_a, emb_b) <= 1e-6 and maxdiff(emb_a, emb_4) > 1e-4  # the same end, and it moved after step 4


# ----------------------------------------------------------------------------- settings and data
@pytest.mark.parametrize("extra, message", [
    ([f"--NEW_TOKEN={TOKEN}", "--INSTANCE_PROMPT=a photo of a dog"], "is not in INSTANCE_PROMPT"),
    ([f"--NEW_TOKEN={TOKEN}", f"--INSTANCE_PROMPT={INSTANCE}", f"--CLASS_PROMPT=a {TOKEN}"], "holds NEW_TOKEN"),
    (["--CLASS_DATA_DIR=./class"], "also set --CLASS_PROMPT"),
    (["--INSTANCE_PROMPT=a dog", "--CLASS_PROMPT=a dog"], "must differ"),
    (["--NEW_TOKEN=two words"], "one word"),
    (["--PRIOR_LOSS_WEIGHT=-1"], "PRIOR_LOSS_WEIGHT must be"),
    (["--NUM_NEW_TOKEN_VECTORS=0"], "NUM_NEW_TOKEN_VECTORS must be"),
    (["--VALIDATION_SPLIT=0.2"], "VALIDATION_SPLIT is for lora_complete_example.py"),
    (["--ASPECT_RATIO_BUCKETING=True"], "ASPECT_RATIO_BUCKETING is for lora_complete_example.py"),
    (["--SHUFFLE_CAPTION_TAGS=True"], "SHUFFLE_CAPTION_TAGS is for lora_complete_example.py"),
])
def test_settings_that_do_not_fit_together_are_one_line_errors(tiny_args, extra, message):
    with pytest.raises(UserError, match=message):
        make_db_cfg(tiny_args, *extra)


def test_the_core_script_has_no_dreambooth_setting(tiny_args):
    with pytest.raises(UserError, match="unknown setting --INSTANCE_PROMPT"):
        lce.resolve_config(tiny_args(f"--INSTANCE_PROMPT={INSTANCE}"))
    assert set(ldb.CONFIG_KEYS) - set(lce.CONFIG_KEYS) == {"INSTANCE_PROMPT", "CLASS_PROMPT", "CLASS_DATA_DIR", "NUM_CLASS_IMAGES",
                                                           "PRIOR_LOSS_WEIGHT", "NEW_TOKEN", "NUM_NEW_TOKEN_VECTORS",
                                                           "NEW_TOKEN_INIT_WORD", "EMBEDDING_LEARNING_RATE"}


def test_a_token_in_no_caption_is_an_error(tiny_args):
    with pytest.raises(UserError, match="appears in no caption"):
        ldb.subject_captions(make_db_cfg(tiny_args, f"--NEW_TOKEN={TOKEN}"), ["a red circle on a blue background"])


def test_instance_prompt_trains_a_folder_without_captions(tiny_args, tmp_path, capsys):
    from lora_tools.shapes import draw

    for i in range(3):
        draw("circle", "purple", "white").save(tmp_path / f"{i}.png")
    cfg = make_db_cfg(tiny_args, f"--DATA_DIR={tmp_path}", f"--INSTANCE_PROMPT={INSTANCE}")
    images, captions = lce.load_captioned_images(cfg, show_progress=False, captions_needed=False)
    assert len(images) == 3 and ldb.subject_captions(cfg, captions) == [INSTANCE] * 3
    assert "no caption" not in capsys.readouterr().out
    assert ldb.encoder_prompts(make_db_cfg(tiny_args, f"--NEW_TOKEN={TOKEN}"), [INSTANCE]) == [expand_token(INSTANCE, TOKEN, N_VECTORS)]


# ----------------------------------------------------------------------------- the demo, on the pretrained shapes model
DEMO_BASE = lce.DEMO_SETTINGS["MODEL_ID"]  # the repository's demo_base/
demo = pytest.mark.xdist_group("dreambooth_demo")  # one worker runs the demo once for these tests


@pytest.fixture(scope="module")
def dreambooth_demo(tmp_path_factory):
    """The DreamBooth demo (`python lora_dreambooth_example.py --DEMO=True`, here in this process): five
    pictures of the subject, a LoRA trained without and one with prior preservation (the same seed), both
    loaded by plain diffusers and judged on prompts they never trained on; what it printed and wrote."""
    import contextlib
    import io
    import json

    from conftest import reset_accelerate

    if not os.path.isfile(os.path.join(DEMO_BASE, "model_index.json")):
        pytest.skip("demo_base/ is missing (python -m lora_tools.demo_base builds it)")
    out = tmp_path_factory.mktemp("dreambooth_demo") / "out"
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            ldb.demo(["--DEMO=True", f"--OUTPUT_DIR={out}"])
    finally:
        reset_accelerate()
    with open(out / "dreambooth_scores.json") as f:
        return printed.getvalue(), json.load(f)


# Measured (`python lora_dreambooth_example.py --DEMO=True`, 51 s on a 2-core CPU; 4 seeds per prompt):
#                                         base   without prior   with prior
#   subject, trained background            0%        100%           100%
#   subject, other backgrounds             0%         69%            94%
#   purple in the class prompt             0%         35%             0%
#   class prompt: mean |pixel - base|                 54.9           40.8
# (The earlier shapes-world test of the same two runs, 8 other seeds, 25 steps: the subject prompt drawn
# purple 0/8 base, 3/8 without prior, 7/8 with; the class prompt's drift 52.7 without, 28.9 with.)


@demo
def test_the_demo_prints_the_table_it_writes(dreambooth_demo):
    printed, scores = dreambooth_demo
    assert list(scores) == ["base model", "without prior", "with prior"]
    for row in ("subject, trained background", "subject, other backgrounds", "purple in the class prompt"):
        line = next(line for line in printed.splitlines() if line.strip().startswith(row))
        assert line.split()[-3:] == [f"{scores[n][row]:.0%}" for n in scores], line


@demo
def test_the_subject_is_learned_with_and_without_prior(dreambooth_demo):
    _, scores = dreambooth_demo
    assert scores["base model"]["subject, trained background"] <= 0.25
    for name in ("without prior", "with prior"):
        assert scores[name]["subject, trained background"] >= 0.75, scores[name]
        assert scores[name]["subject, other backgrounds"] >= 0.5, scores[name]  # backgrounds it never saw it on


@demo
def test_prior_preservation_keeps_the_class_prompt_closer_to_the_base_model(dreambooth_demo):
    """Language drift (Ruiz et al. Sec. 3.3): after learning "a zwx circle ...", how far do the pictures
    of "a circle ..." move from the base model's own at the same seeds, and how often are they purple?"""
    _, scores = dreambooth_demo
    without, with_prior = scores["without prior"], scores["with prior"]
    assert with_prior["purple in the class prompt"] < without["purple in the class prompt"]
    drift = "class prompt: mean |pixel - base pixel|"
    assert with_prior[drift] < 0.9 * without[drift], (with_prior[drift], without[drift])


class SubjectPipe:
    """A pipeline stand-in for subject_report: draws each prompt's picture, the subject's colour where
    its LoRA puts it: on the subject's prompt (learned), and on the class prompt too (leaking)."""

    def __init__(self, leaks):
        self.leaks, self.lora_on = leaks, True

    def disable_lora(self):
        self.lora_on = False

    def enable_lora(self):
        self.lora_on = True

    def __call__(self, prompts, **kwargs):
        from types import SimpleNamespace

        from lora_tools.shapes import draw

        images = []
        for p in prompts:  # "a zwx circle on a <b> background" or "a circle on a <b> background"
            words = p.split()
            subject, background = "zwx" in words, words[-2]
            purple = self.lora_on and (subject or self.leaks)
            images.append(draw("circle", "purple" if purple else "red", background if background != "red" else "blue"))
        return SimpleNamespace(images=images)


def test_subject_report_counts_what_the_pictures_show():
    """The demo's judge on stand-in pipelines whose pictures are known: a LoRA that draws the subject
    and leaks it into the class prompt, and one that does not leak."""
    from lora_tools.shapes import subject_report

    lines = []
    scores = subject_report({"leaky": SubjectPipe(True), "clean": SubjectPipe(False)}, ("circle", "purple", "white"),
                            seeds=[0, 1], steps=2, guidance_scale=4.0, log=lines.append)
    assert scores["base model"] == {"subject, trained background": 0.0, "subject, other backgrounds": 0.0,
                                    "purple in the class prompt": 0.0}
    for name, leak in (("leaky", 1.0), ("clean", 0.0)):
        assert scores[name]["subject, trained background"] == scores[name]["subject, other backgrounds"] == 1.0
        assert scores[name]["purple in the class prompt"] == leak
    drift = "class prompt: mean |pixel - base pixel|"
    assert scores["leaky"][drift] > 10 and scores["clean"][drift] == 0.0
    assert "purple in the class prompt" in lines[0]
