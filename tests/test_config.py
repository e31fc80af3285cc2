"""Settings: --NAME=value overrides (lora_tools.config), the frozen config, DEMO, every value and
path checked before slow work (lora_tools.checks), the mixed-precision choice, and the command
line's own behaviour (one 'error:' line, --help, an import without side effects)."""
import importlib.util
import os
import sys

import pytest
import torch

import lora_complete_example as lce
import lora_dreambooth_example as ldb
from conftest import REPO_ROOT, SCRIPT, run_as_main

DREAMBOOTH_SCRIPT = os.path.join(REPO_ROOT, "lora_dreambooth_example.py")
from lora_tools.checks import check_environment, check_output_dir, check_paths
from lora_tools.config import Config, UserError, parse_overrides


def defaults():
    return {k: getattr(lce, k) for k in lce.CONFIG_KEYS}


def parse(*argv):
    return parse_overrides(list(argv), defaults(), log=lambda message: None)


def plain(value):
    """Compare settings by value: a list setting may be handed out as a tuple."""
    return list(value) if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------- the override rules
@pytest.mark.parametrize("arg, suggestion", [("--LORA_RNAK=8", "LORA_RANK"), ("--lora_rank=8", "LORA_RANK"),
                                             ("--LEARNIG_RATE=1e-3", "LEARNING_RATE"),
                                             ("--VALIDATON_PROMPTS=x", "VALIDATION_PROMPTS")])
def test_unknown_name_is_an_error_that_suggests_the_close_match(arg, suggestion):
    with pytest.raises(UserError) as e:
        parse(arg)
    assert f"--{suggestion}" in str(e.value) and arg.split("=")[0] in str(e.value)
    with pytest.raises(UserError, match="unknown setting --QWERTYUIOP"):
        parse("--QWERTYUIOP=1")


def test_numbers_take_their_default_type_and_an_int_fills_a_float():
    values = parse("--LEARNING_RATE=1", "--GUIDANCE_SCALE=0", "--LORA_RANK=16", "--ADAM_WEIGHT_DECAY=3e-4")
    assert values["LEARNING_RATE"] == 1.0 and type(values["LEARNING_RATE"]) is float
    assert values["GUIDANCE_SCALE"] == 0.0 and values["ADAM_WEIGHT_DECAY"] == 3e-4
    assert values["LORA_RANK"] == 16 and type(values["LORA_RANK"]) is int


@pytest.mark.parametrize("arg", ["--LORA_RANK=4.0", "--LORA_RANK=4.5", "--LORA_RANK=True", "--LORA_RANK=four",
                                 "--BATCH_SIZE=[1]", "--LEARNING_RATE=True", "--LEARNING_RATE=fast",
                                 "--RANDOM_FLIP=true", "--RANDOM_FLIP=1", "--RANDOM_FLIP=", "--RANDOM_FLIP=None",
                                 "--TARGET_MODULES=5"])
def test_a_value_of_the_wrong_type_fails_naming_the_setting(arg):
    with pytest.raises(UserError) as e:
        parse(arg)
    assert arg.split("=")[0] in str(e.value)


def test_bools_take_true_or_false():
    assert parse("--RANDOM_FLIP=False")["RANDOM_FLIP"] is False and parse("--DEMO=True")["DEMO"] is True


def test_none_default_takes_any_literal_or_the_text_and_str_default_the_raw_text():
    values = parse("--MAX_TRAIN_STEPS=100", "--DATA_DIR=./x", "--MAX_TRAIN_SAMPLES=None", "--CAPTION_COLUMN='quoted text'",
                   "--OUTPUT_DIR=None", "--MODEL_ID='a'", "--OUTPUT_NAME=123")
    assert values["MAX_TRAIN_STEPS"] == 100 and type(values["MAX_TRAIN_STEPS"]) is int
    assert values["DATA_DIR"] == "./x" and values["MAX_TRAIN_SAMPLES"] is None and values["CAPTION_COLUMN"] == "quoted text"
    assert values["OUTPUT_DIR"] == "None" and values["MODEL_ID"] == "'a'" and values["OUTPUT_NAME"] == "123"


def test_value_is_split_on_the_first_equals_sign():
    assert parse("--OUTPUT_DIR=a=b")["OUTPUT_DIR"] == "a=b"
    assert parse("--MODEL_ID=x = y == z")["MODEL_ID"] == "x = y == z"
    assert parse("--VALIDATION_PROMPTS=['a=b', 'c']")["VALIDATION_PROMPTS"] == ["a=b", "c"]


@pytest.mark.parametrize("text, expected", [("to_q,to_v", ["to_q", "to_v"]), (" to_q , to_out.0 ", ["to_q", "to_out.0"]),
                                            ("to_out.0", ["to_out.0"]), ("['to_q', 'to_k']", ["to_q", "to_k"]),
                                            ("('to_v',)", ["to_v"])])
def test_list_takes_a_python_list_or_comma_text(text, expected):
    value = parse(f"--TARGET_MODULES={text}")["TARGET_MODULES"]
    assert value == expected and type(value) is list


def test_a_prompt_with_commas_is_one_prompt_and_a_list_gives_several():
    assert parse("--VALIDATION_PROMPTS=a photo of sks dog, in a bucket")["VALIDATION_PROMPTS"] == [
        "a photo of sks dog, in a bucket"]
    assert parse("--VALIDATION_PROMPTS=['a, b', 'c']")["VALIDATION_PROMPTS"] == ["a, b", "c"]
    assert parse("--TARGET_MODULES=to_q,to_v")["TARGET_MODULES"] == ["to_q", "to_v"]  # other lists still split


@pytest.mark.parametrize("arg", ["LORA_RANK=8", "-LORA_RANK=8", "--LORA_RANK", "LORA_RANK", "--", "8"])
def test_argument_without_dashes_or_equals_fails(arg):
    with pytest.raises(UserError, match="--NAME=value"):
        parse(arg)


def test_each_override_is_printed_once_in_order(capsys):
    lce.resolve_config(["--LORA_RANK=8", "--OUTPUT_DIR=a=b", "--LEARNING_RATE=1"])
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("override:")]
    assert out == ["override: LORA_RANK = 8", "override: OUTPUT_DIR = 'a=b'", "override: LEARNING_RATE = 1.0"]


# ----------------------------------------------------------------------------- the frozen config
def test_no_overrides_gives_the_defaults_and_parsing_does_not_touch_them():
    before = defaults()
    assert lce.resolve_config([]).as_dict() == Config(before).as_dict()
    parse("--LORA_RANK=8", "--TARGET_MODULES=to_q")
    assert defaults() == before


def test_resolved_config_is_frozen_also_through_what_it_hands_out():
    original = list(lce.TARGET_MODULES)
    cfg = lce.resolve_config(["--LORA_RANK=8"])
    with pytest.raises(AttributeError):
        cfg.LORA_RANK = 16
    with pytest.raises(AttributeError):
        cfg.NEW_SETTING = 1
    with pytest.raises(AttributeError):
        cfg.NOT_A_SETTING  # noqa: B018
    copy = cfg.as_dict()
    copy["LORA_RANK"] = 99
    copy["TARGET_MODULES"].append("proj_in")
    try:
        cfg.TARGET_MODULES.append("proj_in")
    except (AttributeError, TypeError):
        pass  # an immutable value is fine too
    assert cfg.LORA_RANK == 8 and list(cfg.TARGET_MODULES) == original == list(lce.resolve_config([]).TARGET_MODULES)


# ----------------------------------------------------------------------------- DEMO
def test_demo_swaps_in_the_demo_settings():
    cfg = lce.resolve_config(["--DEMO=True"])
    for k in lce.CONFIG_KEYS:
        expected = lce.DEMO_SETTINGS.get(k, True if k == "DEMO" else getattr(lce, k))
        assert plain(getattr(cfg, k)) == plain(expected), k
    assert lce.resolve_config(["--DEMO=False"]).as_dict() == lce.resolve_config([]).as_dict()


@pytest.mark.parametrize("demo_first", [True, False])
def test_demo_keeps_what_the_command_line_gave(demo_first):
    explicit = ["--RESOLUTION=128", "--LEARNING_RATE=1e-4", "--MAX_TRAIN_STEPS=3"]  # 1e-4 is the non-demo default
    cfg = lce.resolve_config(["--DEMO=True"] + explicit if demo_first else explicit + ["--DEMO=True"])
    assert cfg.RESOLUTION == 128 and cfg.LEARNING_RATE == 1e-4 and cfg.MAX_TRAIN_STEPS == 3
    for k, v in lce.DEMO_SETTINGS.items():
        if k not in ("RESOLUTION", "LEARNING_RATE", "MAX_TRAIN_STEPS"):
            assert plain(getattr(cfg, k)) == plain(v), k


# ----------------------------------------------------------------------------- check_config
@pytest.mark.parametrize("arg, words", [
    ("--RESOLUTION=500", ["RESOLUTION", "500", "512", "multiple of 8"]),
    ("--RESOLUTION=0", ["RESOLUTION"]),
    ("--LORA_RANK=0", ["LORA_RANK", "0"]),
    ("--LORA_RANK=-4", ["LORA_RANK"]),
    ("--LEARNING_RATE=0", ["LEARNING_RATE", "> 0"]),
    ("--LEARNING_RATE=-1", ["LEARNING_RATE", "-1"]),
    ("--LORA_ALPHA=0", ["LORA_ALPHA"]),
    ("--LORA_DROPOUT=1.0", ["LORA_DROPOUT"]),
    ("--MAX_GRAD_NORM=0", ["MAX_GRAD_NORM"]),
    ("--MIXED_PRECISION=fp8", ["MIXED_PRECISION", "fp8", "bf16"]),
    ("--LR_SCHEDULER=exponential", ["LR_SCHEDULER"]),
    ("--TARGET_MODULES=[]", ["TARGET_MODULES"]),
    ("--VALIDATION_PROMPTS=[]", ["VALIDATION_PROMPTS"]),
    ("--BATCH_SIZE=0", ["BATCH_SIZE", "0"]),
    ("--MAX_TRAIN_STEPS=0", ["MAX_TRAIN_STEPS"]),
    ("--MAX_TRAIN_STEPS=many", ["MAX_TRAIN_STEPS"]),
    ("--DATA_DIR=5", ["DATA_DIR"]),
    ("--SAVE_DTYPE=bf16", ["SAVE_DTYPE"]),
    ("--OUTPUT_NAME=a/b", ["OUTPUT_NAME"]),
    ("--REPORT_TO=wandb", ["REPORT_TO"]),
    ("--CENTER_CROP=False", ["CENTER_CROP", "CACHE_LATENTS"]),
    ("--OUTPUT_DIR=", ["OUTPUT_DIR"]),
    ("--CAPTION_DROPOUT=1.0", ["CAPTION_DROPOUT", "0.1"]),
    ("--VALIDATION_SPLIT=1.5", ["VALIDATION_SPLIT", "fraction"]),
    ("--VALIDATION_SPLIT=0", ["VALIDATION_SPLIT"]),
    ("--VALIDATION_LOSS_STEPS=0", ["VALIDATION_LOSS_STEPS"]),
])
def test_bad_value_is_a_one_line_user_error(arg, words):
    with pytest.raises(UserError) as e:
        lce.resolve_config([arg])
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_documented_combinations_and_none_values_are_accepted():
    cfg = lce.resolve_config(["--CENTER_CROP=False", "--CACHE_LATENTS=False", "--MAX_GRAD_NORM=None",
                              "--CHECKPOINTING_STEPS=None"])
    assert cfg.CENTER_CROP is False and cfg.CACHE_LATENTS is False
    assert cfg.MAX_GRAD_NORM is None and cfg.CHECKPOINTING_STEPS is None  # "None = no clipping", "None = never"


# ----------------------------------------------------------------------------- mixed precision
def test_mixed_precision_on_a_cpu():
    assert lce.resolve_mixed_precision("auto", cuda=False) == "no"
    assert lce.resolve_mixed_precision("no", cuda=False) == "no"
    assert lce.resolve_mixed_precision("bf16", cuda=False) == "bf16"
    with pytest.raises(UserError, match=r"fp16.*CUDA.*--MIXED_PRECISION=no"):
        lce.resolve_mixed_precision("fp16", cuda=False)


@pytest.mark.parametrize("gpu, native_bf16, emulated_bf16, auto", [
    ("Tesla T4", False, True, "fp16"),  # torch emulates bf16 on a T4 (slowly): auto must not pick it
    ("NVIDIA A100-SXM4-80GB", True, True, "bf16"),
    ("Tesla K80", False, False, "fp16"),
])
def test_auto_mixed_precision_picks_bf16_only_with_bf16_tensor_cores(monkeypatch, gpu, native_bf16, emulated_bf16, auto):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: emulated_bf16 if including_emulation else native_bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: gpu)
    assert lce.resolve_mixed_precision("auto", cuda=True) == auto
    assert lce.resolve_mixed_precision("fp16", cuda=True) == "fp16"
    if emulated_bf16:  # asked for explicitly, emulated bf16 is allowed
        assert lce.resolve_mixed_precision("bf16", cuda=True) == "bf16"
    else:
        with pytest.raises(UserError, match=f"{gpu}.*--MIXED_PRECISION=fp16"):
            lce.resolve_mixed_precision("bf16", cuda=True)


# ----------------------------------------------------------------------------- paths and packages
@pytest.mark.parametrize("model_id", ["./no-such-model", "/nonexistent/models/sd15", "no-such-model"])
def test_check_paths_refuses_a_missing_local_model_folder(model_id):
    with pytest.raises(UserError, match="MODEL_ID") as e:
        check_paths(lce.resolve_config([f"--MODEL_ID={model_id}"]))
    assert model_id in str(e.value) and "unet" in str(e.value)


def test_check_paths_accepts_a_model_folder_and_a_hub_id_and_names_a_missing_data_dir(tmp_path, tiny_model_dir, tiny_data_dir):
    check_paths(lce.resolve_config([f"--MODEL_ID={tiny_model_dir}", f"--DATA_DIR={tiny_data_dir}"]))
    check_paths(lce.resolve_config(["--MODEL_ID=someone/some-model"]))  # checked when loading
    missing = str(tmp_path / "my_photos")
    with pytest.raises(UserError, match="DATA_DIR") as e:
        check_paths(lce.resolve_config([f"--MODEL_ID={tiny_model_dir}", f"--DATA_DIR={missing}"]))
    assert missing in str(e.value)


def test_hub_id_offline_says_offline_and_cache(make_cfg, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_cfg("--MODEL_ID=nobody-here/not-a-real-model-xyz")
    check_paths(cfg)  # a hub id passes the path check...
    from lora_tools.family import SD1

    for load in (lambda: lce.start(cfg), lambda: lce.load_models(cfg, SD1, torch.float32)):
        with pytest.raises(UserError) as e:  # ...and reading it offline explains why it cannot work
            load()
        message = str(e.value)
        assert "nobody-here/not-a-real-model-xyz" in message and "\n" not in message
        assert ("offline" in message.lower() or "HF_HUB_OFFLINE" in message) and "cache" in message


def test_output_dir_that_cannot_be_created_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    target = str(blocker / "lora_out")  # its parent is a regular file: not even root can create it
    with pytest.raises(UserError, match="OUTPUT_DIR") as e:
        check_output_dir(target)
    assert target in str(e.value) and "writable" in str(e.value)
    assert blocker.read_text() == "not a folder"
    check_output_dir(str(tmp_path / "fine" / "nested"))  # a creatable folder is fine


@pytest.mark.parametrize("package, setting", [("bitsandbytes", "--USE_8BIT_ADAM=True"), ("tensorboard", "--REPORT_TO=tensorboard")])
def test_a_missing_optional_package_is_named_with_pip_install(monkeypatch, package, setting):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.split(".")[0] == package else real(name, *a))
    with pytest.raises(UserError, match=f"pip install {package}") as e:
        check_environment(lce.resolve_config([setting]))
    assert setting[2:].split("=")[0] in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["missing DATA_DIR", "empty DATA_DIR", "unknown CAPTION_COLUMN", "missing MODEL_ID folder",
                                  "unwritable OUTPUT_DIR", "RESUME_FROM not a checkpoint", "tensorboard not installed"])
def test_main_stops_on_a_mistake_before_loading_any_model(case, tmp_path, tiny_args, tiny_model_dir, monkeypatch):
    """main's order: each of these fails as one line before any model is loaded (the first slow step)."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded: the mistake was not caught before the slow work")

    for cls in (DiffusionPipeline, UNet2DConditionModel, CLIPTextModel):
        monkeypatch.setattr(cls, "from_pretrained", no_loading)
    out, extra = str(tmp_path / "out"), []
    if case == "missing DATA_DIR":
        extra, expected = [f"--DATA_DIR={tmp_path / 'no_such_photos'}"], [str(tmp_path / "no_such_photos")]
    elif case == "empty DATA_DIR":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "readme.md").write_text("photos go here")
        extra, expected = [f"--DATA_DIR={tmp_path / 'empty'}"], [str(tmp_path / "empty"), "no images"]
    elif case == "unknown CAPTION_COLUMN":
        extra, expected = ["--CAPTION_COLUMN=caption"], ["CAPTION_COLUMN", "'caption'", "'text'"]
    elif case == "missing MODEL_ID folder":
        extra, expected = [f"--MODEL_ID={tmp_path / 'no_model'}"], ["MODEL_ID", str(tmp_path / "no_model")]
    elif case == "unwritable OUTPUT_DIR":
        (tmp_path / "file").write_text("x")
        out = str(tmp_path / "file" / "out")
        expected = ["OUTPUT_DIR", out]
    elif case == "RESUME_FROM not a checkpoint":
        (tmp_path / "not_a_checkpoint").mkdir()
        extra, expected = [f"--RESUME_FROM={tmp_path / 'not_a_checkpoint'}"], ["RESUME_FROM", "checkpoint"]
    else:
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("tensorboard") else real(name, *a))
        extra, expected = ["--REPORT_TO=tensorboard"], ["REPORT_TO", "pip install tensorboard"]
    with pytest.raises(UserError) as e:
        lce.main(tiny_args(f"--OUTPUT_DIR={out}", "--MAX_TRAIN_STEPS=2", *extra))
    assert "\n" not in str(e.value)
    for w in expected:
        assert w in str(e.value), str(e.value)
    assert not os.path.exists(os.path.join(out, lce.WEIGHTS_NAME))


# ----------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("script", [SCRIPT, DREAMBOOTH_SCRIPT])
def test_command_line_mistake_exits_2_with_one_error_line_and_writes_nothing(tmp_path, script):
    out = tmp_path / "out"
    printed = run_as_main(script, "--LORA_RNAK=8", f"--OUTPUT_DIR={out}")
    assert printed.returncode == 2
    errors = [line for line in printed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--LORA_RANK" in errors[0], printed.stderr
    assert "Traceback" not in printed.stderr + printed.stdout
    assert not out.exists()


@pytest.mark.parametrize("script", [SCRIPT, DREAMBOOTH_SCRIPT])
def test_help_lists_every_setting_with_its_default(script):
    r = run_as_main(script, "--help")
    assert r.returncode == 0
    module = lce if script == SCRIPT else ldb
    printed = r.stdout
    for k in module.CONFIG_KEYS:
        value = getattr(module, k) if hasattr(module, k) else getattr(lce, k)
        assert f"--{k}={value!r}" in printed, k
    assert '--VALIDATION_PROMPTS="a dog, in a bucket"' in printed and "is one prompt" in printed  # how to give prompts


def test_importing_the_script_has_no_side_effects(tmp_path, monkeypatch, capsys):
    """A second, independent import (as another module name) prints nothing, writes nothing and
    does not read sys.argv."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["x", "--LORA_RNAK=8", "--help"])
    spec = importlib.util.spec_from_file_location("lce_import_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert capsys.readouterr() == ("", "")
    assert os.listdir(tmp_path) == [] and module.CONFIG_KEYS == lce.CONFIG_KEYS
