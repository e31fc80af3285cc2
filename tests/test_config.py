"""Acceptance point 1: --NAME=value overrides, the frozen config, DEMO, check_config, and the
command line's own behaviour (one-line errors, --help)."""
import importlib.util
import os
import subprocess
import sys

import pytest

import lora_complete_example as lce
from conftest import REPO_ROOT, SCRIPT, subprocess_env
from lora_tools.config import Config, UserError, parse_overrides, parse_value


def defaults():
    return {k: getattr(lce, k) for k in lce.CONFIG_KEYS}


def plain(value):
    """Compare settings by value: a list setting may be stored as a list or a tuple."""
    return list(value) if isinstance(value, (list, tuple)) else value


def parse(*argv):
    return parse_overrides(list(argv), defaults(), log=lambda message: None)


# ----------------------------------------------------------------------------- the rules
@pytest.mark.parametrize("arg, suggestion", [
    ("--LORA_RNAK=8", "LORA_RANK"),
    ("--lora_rank=8", "LORA_RANK"),
    ("--LEARNIG_RATE=1e-3", "LEARNING_RATE"),
    ("--VALIDATON_PROMPT=x", "VALIDATION_PROMPT"),
])
def test_unknown_name_is_an_error_that_suggests_the_close_match(arg, suggestion):
    with pytest.raises(UserError) as e:
        parse(arg)
    assert f"--{suggestion}" in str(e.value)
    assert arg.split("=")[0] in str(e.value)


def test_unknown_name_without_close_match_is_still_an_error():
    with pytest.raises(UserError, match="unknown setting --QWERTYUIOP"):
        parse("--QWERTYUIOP=1")


def test_int_fills_a_float_setting():
    value = parse("--LEARNING_RATE=1")["LEARNING_RATE"]
    assert value == 1.0 and type(value) is float
    assert parse("--LEARNING_RATE=3e-4")["LEARNING_RATE"] == 3e-4
    assert parse("--GUIDANCE_SCALE=0")["GUIDANCE_SCALE"] == 0.0


@pytest.mark.parametrize("arg", ["--LORA_RANK=4.0", "--LORA_RANK=4.5", "--LORA_RANK=True", "--LORA_RANK=four",
                                 "--BATCH_SIZE=[1]", "--LEARNING_RATE=True", "--LEARNING_RATE=fast"])
def test_wrong_type_for_a_number_fails(arg):
    with pytest.raises(UserError) as e:
        parse(arg)
    assert arg.split("=")[0] in str(e.value)


def test_int_setting_takes_an_int():
    value = parse("--LORA_RANK=16")["LORA_RANK"]
    assert value == 16 and type(value) is int


@pytest.mark.parametrize("text, expected", [("True", True), ("False", False)])
def test_bool_takes_true_or_false(text, expected):
    assert parse(f"--RANDOM_FLIP={text}")["RANDOM_FLIP"] is expected
    assert parse(f"--DEMO={text}")["DEMO"] is expected


@pytest.mark.parametrize("text", ["true", "false", "1", "0", "yes", "", "None"])
def test_bool_rejects_anything_else(text):
    with pytest.raises(UserError, match="RANDOM_FLIP"):
        parse(f"--RANDOM_FLIP={text}")


def test_none_default_takes_any_literal_or_the_text():
    values = parse("--MAX_TRAIN_STEPS=100", "--DATA_DIR=./x", "--IMAGE_COLUMN=image", "--MAX_TRAIN_SAMPLES=None",
                   "--CAPTION_COLUMN='quoted text'")
    assert values["MAX_TRAIN_STEPS"] == 100 and type(values["MAX_TRAIN_STEPS"]) is int
    assert values["DATA_DIR"] == "./x"
    assert values["IMAGE_COLUMN"] == "image"
    assert values["MAX_TRAIN_SAMPLES"] is None
    assert values["CAPTION_COLUMN"] == "quoted text"


def test_str_default_takes_the_raw_text():
    values = parse("--VALIDATION_PROMPT=123", "--OUTPUT_DIR=None", "--MODEL_ID='a'", "--LR_SCHEDULER=cosine")
    assert values["VALIDATION_PROMPT"] == "123"
    assert values["OUTPUT_DIR"] == "None"
    assert values["MODEL_ID"] == "'a'"
    assert values["LR_SCHEDULER"] == "cosine"


def test_value_is_split_on_the_first_equals_sign():
    assert parse("--VALIDATION_PROMPT=a=b")["VALIDATION_PROMPT"] == "a=b"
    assert parse("--VALIDATION_PROMPT=x = y == z")["VALIDATION_PROMPT"] == "x = y == z"
    assert parse("--VALIDATION_PROMPT=")["VALIDATION_PROMPT"] == ""


@pytest.mark.parametrize("text, expected", [
    ("to_q,to_v", ["to_q", "to_v"]),
    (" to_q , to_out.0 ", ["to_q", "to_out.0"]),
    ("to_out.0", ["to_out.0"]),
    ("['to_q', 'to_k']", ["to_q", "to_k"]),
    ("('to_v',)", ["to_v"]),
])
def test_list_takes_a_python_list_or_comma_text(text, expected):
    value = parse(f"--TARGET_MODULES={text}")["TARGET_MODULES"]
    assert value == expected and type(value) is list


def test_list_rejects_a_non_list_literal():
    with pytest.raises(UserError, match="TARGET_MODULES"):
        parse("--TARGET_MODULES=5")


@pytest.mark.parametrize("arg", ["LORA_RANK=8", "-LORA_RANK=8", "--LORA_RANK", "LORA_RANK", "--", "8"])
def test_argument_without_dashes_or_equals_fails(arg):
    with pytest.raises(UserError, match="--NAME=value"):
        parse(arg)


def test_parse_value_is_the_same_rule_set():
    assert parse_value("X", "2", 1.0) == 2.0
    assert parse_value("X", "a,b", ["z"]) == ["a", "b"]
    with pytest.raises(UserError):
        parse_value("X", "2.5", 1)


def test_each_override_is_logged_once_in_order():
    messages = []
    parse_overrides(["--LORA_RANK=8", "--VALIDATION_PROMPT=a=b", "--LEARNING_RATE=1"], defaults(), log=messages.append)
    assert messages == ["override: LORA_RANK = 8", "override: VALIDATION_PROMPT = 'a=b'",
                        "override: LEARNING_RATE = 1.0"]


def test_resolve_config_prints_each_override(capsys):
    lce.resolve_config(["--LORA_RANK=8", "--SEED=7"])
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("override:")] == ["override: LORA_RANK = 8", "override: SEED = 7"]


def test_no_overrides_gives_the_defaults_and_does_not_touch_them():
    before = defaults()
    cfg = lce.resolve_config([])
    assert cfg.as_dict() == Config(before).as_dict()
    parse("--LORA_RANK=8", "--TARGET_MODULES=to_q")
    assert defaults() == before


# ----------------------------------------------------------------------------- frozen config
def test_resolved_config_is_frozen():
    cfg = lce.resolve_config(["--LORA_RANK=8"])
    with pytest.raises(AttributeError):
        cfg.LORA_RANK = 16
    with pytest.raises(AttributeError):
        cfg.NEW_SETTING = 1
    assert cfg.LORA_RANK == 8
    with pytest.raises(AttributeError):
        cfg.NOT_A_SETTING  # noqa: B018
    copy = cfg.as_dict()
    copy["LORA_RANK"] = 99
    copy["TARGET_MODULES"].append("proj_in")
    assert cfg.LORA_RANK == 8 and plain(cfg.TARGET_MODULES) == plain(lce.TARGET_MODULES)


def test_frozen_config_cannot_be_changed_through_a_list_it_hands_out():
    """cfg.TARGET_MODULES is a list; changing it in place must not change the config, nor the
    script's defaults that every later resolve_config starts from."""
    original = list(lce.TARGET_MODULES)
    cfg = lce.resolve_config([])
    try:
        try:
            cfg.TARGET_MODULES.append("proj_in")
        except (AttributeError, TypeError):
            pass  # an immutable value is fine too
        assert list(cfg.TARGET_MODULES) == original
        assert list(lce.resolve_config([]).TARGET_MODULES) == original
    finally:
        if isinstance(lce.TARGET_MODULES, list):
            lce.TARGET_MODULES[:] = original


# ----------------------------------------------------------------------------- DEMO
def test_demo_swaps_in_the_demo_settings():
    cfg = lce.resolve_config(["--DEMO=True"])
    for k, v in lce.demo_settings.items():
        assert plain(getattr(cfg, k)) == plain(v), k
    untouched = set(lce.CONFIG_KEYS) - set(lce.demo_settings) - {"DEMO"}
    for k in untouched:
        assert plain(getattr(cfg, k)) == plain(getattr(lce, k)), k
    assert lce.resolve_config(["--DEMO=False"]).as_dict() == lce.resolve_config([]).as_dict()


@pytest.mark.parametrize("order", ["demo_first", "demo_last"])
def test_demo_keeps_what_the_command_line_gave(order):
    explicit = ["--RESOLUTION=128", "--LEARNING_RATE=1e-4", "--MAX_TRAIN_STEPS=3"]  # 1e-4 is the non-demo default
    argv = ["--DEMO=True"] + explicit if order == "demo_first" else explicit + ["--DEMO=True"]
    cfg = lce.resolve_config(argv)
    assert cfg.RESOLUTION == 128 and cfg.LEARNING_RATE == 1e-4 and cfg.MAX_TRAIN_STEPS == 3
    for k, v in lce.demo_settings.items():
        if k not in ("RESOLUTION", "LEARNING_RATE", "MAX_TRAIN_STEPS"):
            assert plain(getattr(cfg, k)) == plain(v), k


# ----------------------------------------------------------------------------- check_config
@pytest.mark.parametrize("argv, words", [
    (["--RESOLUTION=500"], ["RESOLUTION", "multiple of 8"]),
    (["--RESOLUTION=0"], ["RESOLUTION"]),
    (["--LORA_RANK=0"], ["LORA_RANK"]),
    (["--LORA_RANK=-4"], ["LORA_RANK"]),
    (["--LEARNING_RATE=0"], ["LEARNING_RATE"]),
    (["--LEARNING_RATE=-1e-4"], ["LEARNING_RATE"]),
    (["--LORA_ALPHA=0"], ["LORA_ALPHA"]),
    (["--LORA_DROPOUT=1.0"], ["LORA_DROPOUT"]),
    (["--MAX_GRAD_NORM=0"], ["MAX_GRAD_NORM"]),
    (["--MIXED_PRECISION=fp8"], ["MIXED_PRECISION", "fp8", "bf16"]),
    (["--LR_SCHEDULER=exponential"], ["LR_SCHEDULER"]),
    (["--TARGET_MODULES=[]"], ["TARGET_MODULES"]),
    (["--BATCH_SIZE=0"], ["BATCH_SIZE"]),
    (["--MAX_TRAIN_STEPS=0"], ["MAX_TRAIN_STEPS"]),
    (["--MAX_TRAIN_STEPS=many"], ["MAX_TRAIN_STEPS"]),
    (["--DATA_DIR=5"], ["DATA_DIR"]),
    (["--CENTER_CROP=False"], ["CENTER_CROP", "CACHE_LATENTS"]),
    (["--OUTPUT_DIR="], ["OUTPUT_DIR"]),
])
def test_check_config_rejects_bad_values(argv, words):
    with pytest.raises(UserError) as e:
        lce.resolve_config(argv)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_check_config_accepts_random_crops_without_the_cache():
    cfg = lce.resolve_config(["--CENTER_CROP=False", "--CACHE_LATENTS=False"])
    assert cfg.CENTER_CROP is False and cfg.CACHE_LATENTS is False


@pytest.mark.parametrize("name", [n for n in ("MAX_GRAD_NORM", "CHECKPOINTING_STEPS") if hasattr(lce, n)])
def test_documented_none_value_can_be_given_on_the_command_line(name):
    """MAX_GRAD_NORM's comment says 'None = no clipping' (CHECKPOINTING_STEPS': 'None = never') and
    check_config accepts None, so the command line (the way to set every constant) must be able to say it."""
    assert getattr(lce.resolve_config([f"--{name}=None"]), name) is None


def test_main_rejects_a_bad_override_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="LORA_RANK"):
        lce.main(["--LORA_RNAK=8"])
    assert os.listdir(tmp_path) == []


def test_resolve_mixed_precision_on_a_cpu():
    assert lce.resolve_mixed_precision("auto", cuda=False) == "no"
    assert lce.resolve_mixed_precision("no", cuda=False) == "no"
    assert lce.resolve_mixed_precision("bf16", cuda=False) == "bf16"
    with pytest.raises(UserError, match="no"):
        lce.resolve_mixed_precision("fp16", cuda=False)


# ----------------------------------------------------------------------------- the command line
def test_bad_override_exits_nonzero_with_one_error_line():
    r = subprocess.run([sys.executable, SCRIPT, "--LORA_RNAK=8"], cwd=REPO_ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert "--LORA_RANK" in errors[0]
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout


def test_help_lists_every_setting_with_its_default():
    r = subprocess.run([sys.executable, SCRIPT, "--help"], cwd=REPO_ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for k in lce.CONFIG_KEYS:
        assert f"--{k}={getattr(lce, k)!r}" in r.stdout, k
    assert "Traceback" not in r.stderr


def test_importing_the_script_has_no_side_effects(tmp_path, monkeypatch, capsys):
    """A second, independent import (as another module name) prints nothing, writes nothing and
    does not read sys.argv."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["x", "--LORA_RNAK=8", "--help"])
    spec = importlib.util.spec_from_file_location("lce_import_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert os.listdir(tmp_path) == []
    assert module.CONFIG_KEYS == lce.CONFIG_KEYS
