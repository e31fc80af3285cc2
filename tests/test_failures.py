"""When the numbers or the machine misbehave: a diverging run stops as one 'error:' line and never
replaces good weights or checkpoints, running out of GPU memory names the settings to change (exit
3), files are written atomically, and nothing in the project unpickles code."""
import ast
import glob
import os

import pytest
import torch

import lora_complete_example as lce
from conftest import REPO_ROOT, SCRIPT, run_as_main
from lora_tools.files import atomic_path

OOM_SETTINGS = ("BATCH_SIZE", "GRADIENT_ACCUMULATION_STEPS", "GRADIENT_CHECKPOINTING", "RESOLUTION", "CACHE_LATENTS",
                "MIXED_PRECISION")


def assert_one_error_line(r, *words):
    """Exactly one line starting with 'error:' on stderr, naming `words` (a progress bar before it
    must have ended its line), and no traceback."""
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected one line starting with 'error:' on stderr, got:\n{r.stderr[-3000:]!r}"
    assert all(w in errors[0] for w in words), errors[0]


def file_bytes(folder):
    """{relative path: bytes} of every file under folder."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                found[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return found


@pytest.fixture(scope="module")
def failing_runs(tmp_path_factory, tiny_args):
    """Three tiny runs of the script as __main__ (conftest.run_as_main): a good one (4 steps, checkpoint-3);
    its continuation (RESUME_FROM=latest, 10 steps) whose loss turns NaN, as a learning rate far too high
    makes it (the script does `from torch.nn.functional import mse_loss`, so patching it before the script
    starts reaches the step); one whose loss raises CUDA's out-of-memory error."""
    out = tmp_path_factory.mktemp("diverge") / "out"
    run_as_main(SCRIPT, *tiny_args("--MAX_TRAIN_STEPS=4", "--CHECKPOINTING_STEPS=3", f"--OUTPUT_DIR={out}"))
    before = {k: v for k, v in file_bytes(str(out)).items() if k.endswith((".safetensors", ".pt", ".json"))}
    assert lce.WEIGHTS_NAME in before and os.path.join("checkpoint-3", "training_state.pt") in before

    def diverged(prediction, target, reduction="mean"):
        return (prediction - target) ** 2 * float("nan")  # (reduction="none", as the script asks)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "mse_loss", diverged)
        diverge = run_as_main(SCRIPT, *tiny_args("--MAX_TRAIN_STEPS=10", "--CHECKPOINTING_STEPS=3", "--RESUME_FROM=latest",
                                                 f"--OUTPUT_DIR={out}"))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "mse_loss", out_of_memory)
        oom = run_as_main(SCRIPT, *tiny_args("--MAX_TRAIN_STEPS=5", f"--OUTPUT_DIR={out.parent / 'oom_out'}"))
    return dict(out=str(out), before=before, diverge=diverge, oom=oom)


@pytest.mark.xdist_group("failures")
def test_divergence_exits_2_with_one_error_line_naming_learning_rate(failing_runs):
    r = failing_runs["diverge"]
    assert r.returncode == 2, r.stderr[-3000:]
    assert_one_error_line(r, "training diverged", "LEARNING_RATE")


@pytest.mark.xdist_group("failures")
def test_divergence_leaves_existing_weights_and_checkpoints_byte_identical(failing_runs):
    """The continuation diverged at its first step: the good run's files are as they were."""
    after = file_bytes(failing_runs["out"])
    for name, data in failing_runs["before"].items():
        assert after.get(name) == data, f"{name} was changed or removed by the failed run"
    assert not [n for n in after if os.path.basename(n).startswith((".tmp-", ".checkpoint-"))]  # no half-written file
    assert not any(n.startswith("checkpoint-") and n != "checkpoint-3" for n in os.listdir(failing_runs["out"]))


@pytest.mark.xdist_group("failures")
def test_out_of_memory_exits_3_naming_the_settings_to_change(failing_runs):
    r = failing_runs["oom"]
    assert r.returncode == 3, r.stderr[-3000:]
    assert_one_error_line(r, "out of GPU memory", *OOM_SETTINGS)


def test_atomic_path_failure_midway_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"old complete file")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(str(target)) as tmp:
            assert os.path.dirname(tmp) == str(tmp_path)  # same folder: the rename is atomic
            with open(tmp, "wb") as f:
                f.write(b"half a new fi")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old complete file" and os.listdir(tmp_path) == ["weights.safetensors"]
    with pytest.raises(KeyboardInterrupt):  # a new file: nothing at all, then the complete one
        with atomic_path(str(tmp_path / "new.png")) as tmp:
            open(tmp, "wb").write(b"partial")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["weights.safetensors"]
    with atomic_path(str(tmp_path / "new.png")) as tmp:
        open(tmp, "wb").write(b"complete")
    assert (tmp_path / "new.png").read_bytes() == b"complete"


def build_after(barrier, path):
    from lora_tools.shapes import build_concept_dataset

    barrier.wait()  # both processes start building at the same moment
    build_concept_dataset(path)


def test_two_processes_building_the_demo_data_at_once_both_find_it_complete(tmp_path):
    """The demo's pictures (.demo_cache/purple-shapes) are built by whichever process needs them first;
    two at once (two test workers, two `accelerate launch` processes) must both end with the complete
    folder: one rename wins, the other drops its copy. Three races, each from a fresh start."""
    import multiprocessing

    from lora_tools.shapes import CONCEPT_TRAIN

    ctx = multiprocessing.get_context("fork")
    for race in range(3):
        path = str(tmp_path / f"race{race}" / "purple-shapes")
        barrier = ctx.Barrier(2)
        procs = [ctx.Process(target=build_after, args=(barrier, path)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0], race
        names = sorted(os.listdir(path))
        assert names == sorted([f"{i:03d}.png" for i in range(3 * len(CONCEPT_TRAIN))] + ["metadata.jsonl"])
        assert os.listdir(os.path.dirname(path)) == ["purple-shapes"]  # no half-built copy left behind


def project_sources():
    files = [lce.__file__, *glob.glob(os.path.join(REPO_ROOT, "lora_tools", "*.py")),
             *glob.glob(os.path.join(REPO_ROOT, "benchmarks", "*.py"))]
    return sorted(os.path.abspath(f) for f in files)


def dotted(node):
    """`a.b.c` of a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def resolved_call_names(tree):
    """(call node, fully qualified name) for every call, following `import x as y` / `from x import y`."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            if name:
                head, _, rest = name.partition(".")
                full = aliases.get(head, head) + ("." + rest if rest else "")
                yield node, full


def test_no_code_is_unpickled_anywhere():
    files = project_sources()
    assert lce.__file__ in files and any(f.endswith("checkpoint.py") for f in files)
    problems, torch_loads = [], 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        where = os.path.relpath(path, REPO_ROOT)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(m.split(".")[0] in ("pickle", "cPickle", "dill", "_pickle") for m in mods):
                    problems.append(f"{where}:{node.lineno} imports pickle")
        for call, name in resolved_call_names(tree):
            kw = {k.arg: k.value for k in call.keywords if k.arg}
            if name == "torch.load":
                torch_loads += 1
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    problems.append(f"{where}:{call.lineno} torch.load without weights_only=True")
            if name.split(".")[0] in ("pickle", "dill", "_pickle") and name.split(".")[-1] in ("load", "loads", "Unpickler"):
                problems.append(f"{where}:{call.lineno} {name}")
            v = kw.get("trust_remote_code")
            if v is not None and not (isinstance(v, ast.Constant) and v.value is False):
                problems.append(f"{where}:{call.lineno} trust_remote_code={ast.unparse(v)}")
        for node in ast.walk(tree):  # trust_remote_code in a {...} passed on as **kwargs (dict(...) is a call, above)
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and not (
                            isinstance(v, ast.Constant) and v.value is False):
                        problems.append(f"{where}:{node.lineno} trust_remote_code in a dict")
    assert torch_loads >= 1, "the scan found no torch.load at all: it is not looking at the right files"
    assert problems == []
