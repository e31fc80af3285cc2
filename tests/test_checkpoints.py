"""Checkpoints: an exact resume mid-epoch through RESUME_FROM=latest (the text encoder's adapter
included), metrics.jsonl kept up to the checkpoint, CHECKPOINTS_TOTAL_LIMIT, folders plain tools can
read, clear errors before any slow work; Ctrl-C and SIGTERM save a checkpoint,
print the resume command and exit 130 / 143; with several processes the stop flag is compared only
where the processes sync anyway."""
import contextlib
import io
import json
import os
import re
import shlex
import signal
import threading
import time

import pytest
import torch

import lora_complete_example as lce
from conftest import (SCRIPT, SCRIPT_NAME, capture_library_messages, fresh_pipe, key_complaints, lora_weights,
                      maxdiff, run_as_main, run_main)
from lora_tools.checkpoint import resolve_resume
from lora_tools.config import UserError

pytestmark = pytest.mark.xdist_group("checkpoints")  # one worker: the module fixtures are built once


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max(maxdiff(a[k], b[k]) for k in a)


def checkpoint_names(folder):
    return sorted((n for n in os.listdir(folder) if n.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1]))


def leftovers(folder):
    """Temporary files/folders of interrupted atomic writes (atomic_path's .tmp-*, checkpoints' .checkpoint-*)."""
    return [os.path.join(root, n) for root, dirs, files in os.walk(folder) for n in dirs + files
            if n.startswith((".tmp-", ".checkpoint-", ".write-test-"))]


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- exact resume
@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory, tiny_args):
    """A: 12 steps, a checkpoint every 3, the newest 2 kept (6 and 9); 8 images, BATCH_SIZE=3 and
    GRADIENT_ACCUMULATION_STEPS=2 make 2 optimizer steps an epoch (the second on one micro-batch), so
    step 9 is mid-epoch; a third of the captions dropped (CAPTION_DROPOUT). Then RESUME_FROM=latest in A's
    own folder: it continues from checkpoint-9."""
    root = tmp_path_factory.mktemp("resume")
    argv = tiny_args("--BATCH_SIZE=3", "--GRADIENT_ACCUMULATION_STEPS=2", "--LORA_DROPOUT=0.1", "--CAPTION_DROPOUT=0.3",
                     "--MAX_TRAIN_STEPS=12",
                     "--CHECKPOINTING_STEPS=3", "--CHECKPOINTS_TOTAL_LIMIT=2", "--LOG_EVERY=1", f"--OUTPUT_DIR={root / 'A'}")
    a = run_main(argv)
    after_a = dict(checkpoints=checkpoint_names(a.out), leftovers=leftovers(a.out), weights=lora_weights(a.out),
                   metrics=metrics(a.out), at_9=lora_weights(os.path.join(a.out, "checkpoint-9")))
    latest = run_main(argv + ["--RESUME_FROM=latest"])
    return dict(a=a, after_a=after_a, latest=latest, argv=argv, root=root)


def test_latest_resumes_mid_epoch_and_ends_with_the_same_weights_and_metrics(resume_runs):
    a, latest, after_a = resume_runs["a"], resume_runs["latest"], resume_runs["after_a"]
    assert "2 steps/epoch" in a.log and re.search(r"resumed from .*checkpoint-9 at step 9", latest.log), latest.log
    assert max_abs_diff(after_a["weights"], after_a["at_9"]) > 1e-4  # steps 10-12 trained something
    assert max_abs_diff(after_a["weights"], lora_weights(a.out)) <= 1e-5
    assert "trained 3 steps" in latest.log
    # metrics.jsonl: the lines up to the checkpoint kept, then the same steps, losses and rates again
    again = metrics(a.out)
    assert [(r["step"], r["epoch"], r["lr"]) for r in again] == [(r["step"], r["epoch"], r["lr"]) for r in after_a["metrics"]]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in after_a["metrics"]], rel=1e-5)


def test_checkpoints_total_limit_keeps_the_newest_and_no_half_written_files(resume_runs):
    assert resume_runs["after_a"]["checkpoints"] == ["checkpoint-6", "checkpoint-9"] and resume_runs["after_a"]["leftovers"] == []
    assert checkpoint_names(resume_runs["a"].out) == ["checkpoint-6", "checkpoint-9"]  # the last step is no checkpoint


# ----------------------------------------------------------------------------- a folder is one run's
def snapshot(folder):
    """Every file under folder with its bytes' hash."""
    import hashlib

    return {os.path.relpath(os.path.join(root, n), folder): hashlib.sha256(open(os.path.join(root, n), "rb").read()).hexdigest()
            for root, _, files in os.walk(folder) for n in files}


def earlier_run_copy(resume_runs, tmp_path, **config):
    """A copy of run A's folder (12 steps; checkpoint-6, checkpoint-9), its settings changed by config."""
    import shutil

    folder = tmp_path / "used"
    shutil.copytree(resume_runs["a"].out, folder)
    for path in [folder / "training_config.json"] + [folder / c / "training_config.json" for c in checkpoint_names(folder)]:
        path.write_text(json.dumps(json.loads(path.read_text()) | config))
    return str(folder)


def test_a_new_run_into_another_runs_folder_stops_before_any_loading_and_changes_nothing(resume_runs, tmp_path):
    used = earlier_run_copy(resume_runs, tmp_path)
    before = snapshot(used)
    argv = [a for a in resume_runs["argv"] if not a.startswith("--OUTPUT_DIR=")] + [f"--OUTPUT_DIR={used}"]
    printed = io.StringIO()
    with pytest.raises(UserError) as e, contextlib.redirect_stdout(printed):
        lce.main(argv)
    message = str(e.value)
    assert "another run's results" in message and "\n" not in message
    assert all(way in message for way in ("--RESUME_FROM=latest", "new --OUTPUT_DIR", "--OVERWRITE_OUTPUT_DIR=True"))
    assert "trainable LoRA parameters" not in printed.getvalue()  # before the models
    assert snapshot(used) == before


def test_overwrite_replaces_the_earlier_run_and_the_limit_prunes_only_this_runs_checkpoints(resume_runs, tmp_path, tiny_args):
    """The earlier run left checkpoint-6 and -9; this one checkpoints at 2 and 4 and keeps 2: by step number
    alone, pruning would delete its own two and keep the earlier run's, which RESUME_FROM=latest would pick."""
    used = earlier_run_copy(resume_runs, tmp_path)
    run = run_main(tiny_args("--MAX_TRAIN_STEPS=5", "--CHECKPOINTING_STEPS=2", "--CHECKPOINTS_TOTAL_LIMIT=2", "--LOG_EVERY=1",
                             "--OVERWRITE_OUTPUT_DIR=True", f"--OUTPUT_DIR={used}"))
    assert "replacing the earlier run's results" in run.log
    assert checkpoint_names(used) == ["checkpoint-2", "checkpoint-4"]
    assert [r["step"] for r in metrics(used)] == [1, 2, 3, 4, 5]  # this run's lines only
    assert resolve_resume("latest", used) == os.path.join(used, "checkpoint-4")


def test_a_demo_run_is_replaced_without_asking(resume_runs, tmp_path, tiny_args):
    used = earlier_run_copy(resume_runs, tmp_path, DEMO=True)  # as if the folder held the demo's results
    run = run_main(tiny_args("--MAX_TRAIN_STEPS=1", f"--OUTPUT_DIR={used}"))
    assert "replacing the earlier demo run's results" in run.log
    assert checkpoint_names(used) == [] and [r["step"] for r in metrics(used)] == [1]  # this run's one step
    assert json.loads(open(os.path.join(used, "training_config.json")).read())["MAX_TRAIN_STEPS"] == 1


def test_checkpoint_folder_is_readable_by_plain_tools(resume_runs, tiny_model_dir):
    ckpt = os.path.join(resume_runs["a"].out, "checkpoint-9")
    assert {"pytorch_lora_weights.safetensors", "training_config.json", "training_state.pt"} <= set(os.listdir(ckpt))
    state = torch.load(os.path.join(ckpt, "training_state.pt"), map_location="cpu", weights_only=True)
    assert state["step"] == 9 and set(state) == {"step", "trainable", "optimizer", "lr_scheduler", "scaler", "rng"}
    assert isinstance(state["rng"], list) and len(state["rng"]) == 1  # one process, one set of RNG states
    with open(os.path.join(ckpt, "training_config.json")) as f:
        config = json.load(f)
    assert config["LORA_RANK"] == 4 and config["BATCH_SIZE"] == 3 and config["LORA_DROPOUT"] == 0.1
    with capture_library_messages() as messages:
        pipe = fresh_pipe(tiny_model_dir, ckpt)
    assert key_complaints(messages) == [], messages
    assert len([n for n, _ in pipe.unet.named_parameters() if "lora_" in n]) == len(lora_weights(ckpt)) > 0


def test_resume_with_a_different_rank_fails_before_any_model_is_loaded(resume_runs):
    out = str(resume_runs["root"] / "rank8")
    argv = [a for a in resume_runs["argv"] if not a.startswith("--OUTPUT_DIR=")]
    printed = io.StringIO()
    with pytest.raises(UserError) as e, contextlib.redirect_stdout(printed):
        lce.main(argv + [f"--OUTPUT_DIR={out}", "--LORA_RANK=8",
                         f"--RESUME_FROM={os.path.join(resume_runs['a'].out, 'checkpoint-9')}"])
    assert all(w in str(e.value) for w in ("LORA_RANK", "4", "8")) and "\n" not in str(e.value)
    assert "trainable LoRA parameters" not in printed.getvalue()
    assert not os.path.exists(os.path.join(out, lce.WEIGHTS_NAME))


def test_resume_from_a_folder_that_is_no_checkpoint_is_a_clear_error(resume_runs):
    for not_a_checkpoint in (resume_runs["a"].out, os.path.join(resume_runs["root"], "nowhere")):
        with pytest.raises(UserError, match="RESUME_FROM") as e:
            resolve_resume(not_a_checkpoint, resume_runs["a"].out)
        assert not_a_checkpoint in str(e.value)


def test_resume_includes_the_text_encoder(feature_run, tmp_path):
    argv = [a for a in feature_run.argv if not a.startswith(("--OUTPUT_DIR=", "--SAVE_MERGED_MODEL="))]
    ckpt = os.path.join(feature_run.out, "checkpoint-5")
    resumed = run_main(argv + [f"--OUTPUT_DIR={tmp_path / 'out'}", f"--RESUME_FROM={ckpt}"])
    assert re.search(r"resumed from .*checkpoint-5 at step 5", resumed.log), resumed.log[-2000:]
    before, full, again = lora_weights(ckpt), lora_weights(feature_run.out), lora_weights(resumed.out)
    assert before.keys() == full.keys() == again.keys()
    for part in ("unet.", "text_encoder."):
        keys = [k for k in full if k.startswith(part)]
        assert keys and max(maxdiff(full[k], before[k]) for k in keys) > 1e-4, part  # steps 6-10 trained this part
        assert max(maxdiff(full[k], again[k]) for k in keys) <= 1e-5, part


# ----------------------------------------------------------------------------- several processes: when to compare stop flags
class TwoProcesses:
    """An accelerator stand-in for one of two processes; the other's stop flag is `other`."""

    num_processes, device = 2, torch.device("cpu")

    def __init__(self, other):
        self.other, self.reduces = other, 0

    def reduce(self, tensor, reduction):
        self.reduces += 1
        assert reduction == "max"
        return torch.maximum(tensor, torch.tensor(float(self.other)))


@pytest.mark.parametrize("mine, other", [(True, False), (False, True), (False, False)])
def test_processes_compare_stop_flags_only_at_sync_points(mine, other):
    stop = lce.StopRequest()
    try:
        stop.signum = signal.SIGINT if mine else None
        acc = TwoProcesses(other)
        assert [stop.agreed(acc, sync_now=False) for _ in range(5)] == [False] * 5 and acc.reduces == 0
        assert stop.agreed(acc, sync_now=True) is (mine or other) and acc.reduces == 1  # both stop at the same step
        one = type("OneProcess", (), {"num_processes": 1})()  # alone: no one to agree with, stop at once
        assert stop.agreed(one, sync_now=False) is mine
    finally:
        stop.restore()


# ----------------------------------------------------------------------------- Ctrl-C and SIGTERM
def stopped_run(tiny_args, out, signum, *extra):
    """The script run as __main__ (conftest.run_as_main) for 5000 steps; once it has logged its first
    step, this process sends itself `signum` (Ctrl-C is SIGINT; `kill`, Slurm and docker stop send SIGTERM)."""

    def signal_once_training():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip():
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.05)

    threading.Thread(target=signal_once_training, daemon=True).start()
    args = tiny_args("--MAX_TRAIN_STEPS=5000", "--CHECKPOINTING_STEPS=None", "--LOG_EVERY=1", f"--OUTPUT_DIR={out}", *extra)
    return run_as_main(SCRIPT, *args), args


def parse_stop(text, out):
    m = re.search(r"stopped at step (\d+); resume with:\s*\n\s*(.+)", text)
    assert m, text[-3000:]
    step, command = int(m.group(1)), m.group(2).strip()
    assert "--RESUME_FROM=" in command
    assert {"pytorch_lora_weights.safetensors", "training_config.json", "training_state.pt"} <= set(os.listdir(out / f"checkpoint-{step}"))
    state = torch.load(out / f"checkpoint-{step}" / "training_state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == step
    assert not (out / lce.WEIGHTS_NAME).exists()  # a stopped run leaves only the checkpoint
    return step, command


def test_ctrl_c_checkpoints_prints_the_resume_command_and_it_works(tiny_args, tmp_path):
    out = tmp_path / "out"
    r, args = stopped_run(tiny_args, out, signal.SIGINT)
    assert r.returncode == 130 and "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    step, command = parse_stop(r.stdout, out)
    resume = shlex.split(command)
    assert resume[:2] == ["python", SCRIPT_NAME] and f"--RESUME_FROM={out / f'checkpoint-{step}'}" in resume
    assert [a for a in resume[2:] if not a.startswith("--RESUME_FROM=")] == args  # every setting kept
    # the printed command: the script with these arguments (run here in this process), two more steps
    again = run_main([a if not a.startswith("--MAX_TRAIN_STEPS=") else f"--MAX_TRAIN_STEPS={step + 2}" for a in resume[2:]])
    assert re.search(rf"resumed from .*checkpoint-{step} at step {step}\b", again.log), again.log[-3000:]
    assert "trained 2 steps" in again.log
    assert (out / lce.WEIGHTS_NAME).is_file() and (out / "test_generation.png").is_file()


def test_sigterm_checkpoints_and_exits_143_on_sdxl_too(tiny_args, tmp_path, xl_model):
    out = tmp_path / "out"
    r, _ = stopped_run(tiny_args, out, signal.SIGTERM, f"--MODEL_ID={xl_model}")
    assert "SDXL" in r.stdout
    assert r.returncode == 143 and "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    parse_stop(r.stdout, out)


def test_a_lora_trained_with_dropout_loads_without_it(resume_runs, tiny_model_dir):
    """LORA_DROPOUT=0.1 trained A. Dropout belongs to training: the file records lora_dropout 0, or
    diffusers' load_lora_weights would build live dropout layers (new modules start in training mode),
    and every picture from the file — test_generation.png too — would be random."""
    from conftest import pixel_diff, read_safetensors, render

    out = resume_runs["a"].out
    _, metadata = read_safetensors(os.path.join(out, lce.WEIGHTS_NAME))
    meta = json.loads(metadata["lora_adapter_metadata"])
    assert meta["unet.lora_dropout"] == 0.0 and json.loads(metadata["training_config"])["LORA_DROPOUT"] == 0.1
    pipe = fresh_pipe(tiny_model_dir, out)
    live = [n for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Dropout) and "lora" in n and m.p > 0]
    assert live == []
    cfg = lce.resolve_config(resume_runs["argv"] + [f"--OUTPUT_DIR={out}"])
    assert pixel_diff(os.path.join(out, "test_generation.png"), render(pipe, cfg)) == 0
