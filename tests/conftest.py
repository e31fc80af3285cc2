"""What the test files share: the tiny SD-shaped model and data (tests/tiny.py), the arguments of a
tiny run, the script run in this process (lce.main) or as a user runs it (a subprocess, or two
processes under `accelerate launch`), the runs several files read (two small LoRAs, the feature run,
the demo), and the tools for comparing what the runs wrote (maxdiff, safetensors files, PNGs, outputs).

The suite runs on two pytest-xdist workers (pytest.ini). A run or model that several files read is
built once per session by whichever worker asks first, under a file lock, and read back by the other
(`built_once`); tests that share a heavy module fixture carry one `xdist_group`, so one worker runs them.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread (here and in the subprocesses, which inherit it): the tiny models gain nothing
# from more, and OpenMP threads competing for 2 busy cores can make each op hundreds of times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import lora_complete_example as lce  # noqa: E402
from tiny import build_tiny_dataset, build_tiny_pipeline, build_tiny_sdxl_pipeline  # noqa: E402

# The libraries' objects, imported above, are never garbage: keep them out of every collection the
# script's runs ask for (gc.collect before rendering: about a second a run in a process this size).
gc.freeze()

SCRIPT = os.path.join(REPO_ROOT, "lora_complete_example.py")
SCRIPT_NAME = os.path.basename(SCRIPT)  # run as `python lora_complete_example.py` in the repository root
WEBUI_NAME = "my_lora.safetensors"  # OUTPUT_NAME's default + .safetensors
TINY_RUN = dict(RESOLUTION=64, MIXED_PRECISION="no", BATCH_SIZE=4, GRADIENT_ACCUMULATION_STEPS=1, LEARNING_RATE=1e-3,
                LOG_EVERY=5, NUM_INFERENCE_STEPS=2, NUM_VALIDATION_SEEDS=1)


# ----------------------------------------------------------------------------- running the script
def reset_accelerate():
    """Accelerator() keeps process-wide state; each run or test may create its own (fp32 or bf16)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run_main(argv, script=lce):
    """script.main(argv) in this process (lora_complete_example, or lora_dreambooth_example):
    (argv, out = OUTPUT_DIR, log = what it printed, cfg, t0, t1)."""
    buf, t0 = io.StringIO(), time.time()
    try:
        with contextlib.redirect_stdout(buf):
            script.main(argv)
    except Exception as e:
        raise AssertionError(f"{script.__name__}.main failed: {e!r}\n{buf.getvalue()[-3000:]}") from e
    finally:
        reset_accelerate()
    t1 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):  # its override lines are in the log already
        cfg = script.resolve_config(argv)
    return SimpleNamespace(argv=argv, out=cfg.OUTPUT_DIR, log=buf.getvalue(), cfg=cfg, t0=t0, t1=t1)


def run_as_main(script, *args):
    """`python <script> ARGS` in this process: the file run as __main__ (runpy), as a subprocess would
    run it but without importing the libraries again. CompletedProcess(args, returncode, stdout, stderr)."""
    import runpy

    out, err, code = io.StringIO(), io.StringIO(), 0
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setattr(sys, "argv", [script, *args])
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            reset_accelerate()
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def subprocess_env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def start_script(*args, program=SCRIPT_NAME, launch=False, **popen):
    """Start `python lora_complete_example.py ARGS` in the repository root (program: another file run
    the same way). launch=True: under `accelerate launch` with two CPU processes instead — `--multi_gpu`
    on a machine without CUDA starts them with torchrun and the script's Accelerator(cpu=True) joins
    them with gloo (`--cpu --num_processes 2` would start ONE process: accelerate spreads CPU jobs
    only through mpirun)."""
    head = [sys.executable]
    if launch:
        head += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no"]
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([*head, program, *args], cwd=REPO_ROOT, env=subprocess_env(), text=True, **popen)


def finish(proc, timeout=600, check=True):
    """Wait for a start_script process: CompletedProcess(args, returncode, stdout, stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} ran over {timeout}s:\n{out[-2000:]}\n{without_progress_bars(err)[-3000:]}")
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and r.returncode != 0:
        pytest.fail(f"{' '.join(proc.args)} -> exit {r.returncode}\nstdout:\n{out[-3000:]}\nstderr:\n{without_progress_bars(err)[-5000:]}")
    return r


def run_script(*args, check=True, timeout=600, **kw):
    return finish(start_script(*args, **kw), timeout, check)


def without_progress_bars(text):
    return "\n".join(line for line in text.replace("\r", "\n").splitlines() if not re.search(r"\d(it/s|s/it)\]", line))


def python_driver(path, setup):
    """A file that runs `setup` (Python lines), then the script with its own command line, as
    `python lora_complete_example.py ...` would: for patching a library before the script starts."""
    code = f"import runpy, sys\n{setup}\nsys.argv[0], sys.path[0] = {SCRIPT!r}, {REPO_ROOT!r}\nrunpy.run_path({SCRIPT!r}, run_name='__main__')\n"
    with open(path, "w") as f:
        f.write(code)
    return str(path)


# ----------------------------------------------------------------------------- comparing results
def maxdiff(a, b):
    return (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()


def tol(ref, rel=1e-5):
    return rel * max(1.0, ref.abs().max().item())


def assert_close(actual, expected, rel=1e-5, what=""):
    d, t = maxdiff(actual, expected), tol(expected, rel)
    assert d <= t, f"{what}: max |diff| {d:.3g} > {t:.3g}"


def read_safetensors(path):
    """(tensors, metadata) of a safetensors file."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def lora_weights(folder, name=lce.WEIGHTS_NAME):
    return read_safetensors(os.path.join(folder, name))[0]


def png(path_or_image):
    """A PNG file (or a PIL image) as an int16 array, for pixel differences."""
    from PIL import Image

    img = Image.open(path_or_image) if isinstance(path_or_image, str) else path_or_image
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def pixel_diff(a, b):
    a, b = png(a), png(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a - b).max())


def fixed_inputs(seed=2024, batch=2, size=8, cross_dim=32, vocab=514):
    """(z, t, c) for the tiny UNet and token ids for the tiny text encoder, independent of the script."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 4, size, size, generator=g)
    c = torch.randn(batch, 77, cross_dim, generator=g)
    t = torch.tensor([37, 613][:batch] + [500] * max(0, batch - 2))
    return z, t, c, torch.randint(2, vocab, (batch, 77), generator=g)


@torch.no_grad()
def outputs(unet, text_encoder=None, inputs=None):
    """UNet output and text-encoder last_hidden_state on fixed inputs, in eval mode (modes restored)."""
    z, t, c, ids = inputs or fixed_inputs()
    modes = [(m, m.training) for m in (unet, text_encoder) if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        y = unet(z, t, c, return_dict=False)[0].float()
        h = text_encoder(ids).last_hidden_state.float() if text_encoder is not None else None
    finally:
        for m, mode in modes:
            m.train(mode)
    return y, h


def fresh_pipe(model_dir, lora_dir=None, **load_kwargs):
    """Plain diffusers: the base pipeline from disk, with a LoRA folder loaded if given."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, **load_kwargs)
    return pipe


def pipe_outputs(pipe, inputs=None):
    return outputs(pipe.unet, pipe.text_encoder, inputs)


def render(pipe, cfg, prompt=None, seed=None):
    """The script's test image, as its printed recipe renders it with plain diffusers."""
    return pipe(prompt or cfg.VALIDATION_PROMPTS[0], height=cfg.RESOLUTION, width=cfg.RESOLUTION,
                num_inference_steps=cfg.NUM_INFERENCE_STEPS, guidance_scale=cfg.GUIDANCE_SCALE,
                generator=torch.Generator().manual_seed(cfg.SEED if seed is None else seed)).images[0]


def lora_layer_names(model):
    from peft.tuners.lora import LoraLayer

    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def total_grad_norm(params):
    grads = [p.grad.detach().float() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


@contextlib.contextmanager
def capture_library_messages():
    """Collect log records of diffusers / peft / transformers (diffusers' root logger does not
    propagate, so caplog would miss them) and Python warnings, as one list of strings."""
    messages = []

    class ListHandler(logging.Handler):
        def emit(self, record):
            messages.append(f"{record.name}: {record.getMessage()}")

    handler = ListHandler(level=logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(f"warning: {w.message}" for w in caught)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def key_complaints(messages):
    """Messages about unexpected or missing keys (what a mismatched LoRA file produces). Not the
    notice that the file has no text-encoder LoRA ("No LoRA keys associated to CLIPTextModel")."""
    pattern = re.compile(r"(unexpected|missing|unused|not used|mismatch\w*)[ _]+(lora[ _]+)?keys?|keys? (were )?not (used|found)", re.I)
    return [m for m in messages if pattern.search(m)]


# ----------------------------------------------------------------------------- fixtures
HEAVIEST_FIRST = ["dreambooth_demo", "test_multiprocess", "demo"]  # xdist groups that take a minute or more


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the marks
def pytest_collection_modifyitems(items):
    """pytest-xdist (--dist loadgroup): a test that uses a module-scoped fixture of its own file joins
    the group of that file, so one worker builds the fixture once; an xdist_group mark of its own wins.
    The heaviest groups are collected first, so that the two workers start on them at once (pytest.ini
    keeps the collection order: --no-loadscope-reorder)."""
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        defs = [d for ds in item._fixtureinfo.name2fixturedefs.values() for d in ds]
        if any(d.scope == "module" and item.nodeid.startswith(d.baseid + "::") for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))

    def rank(item):
        mark = item.get_closest_marker("xdist_group")
        group = (mark.args[0] if mark.args else mark.kwargs.get("name")) if mark else None
        return HEAVIEST_FIRST.index(group) if group in HEAVIEST_FIRST else len(HEAVIEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _reset_accelerate_state():
    yield
    if "accelerate" in sys.modules:
        reset_accelerate()


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory, worker_id):
    """A folder of this session that every xdist worker sees (each worker's own tmp folders sit in it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if worker_id != "master" else base


def built_once(root, name, build):
    """The JSON-able result of build(folder) for root/name: computed by the first worker that asks,
    under a file lock (the other waits), and read back from root/name.json by everyone after."""
    from filelock import FileLock

    done = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            result = build(str(root / name))
            done.write_text(json.dumps(result))
    return json.loads(done.read_text())


def shared_run(root, name, argv_for):
    """run_main(argv_for(folder)) once per session (built_once), as run_main's namespace."""

    def build(folder):
        r = run_main(argv_for(folder))
        return dict(argv=r.argv, log=r.log, t0=r.t0, t1=r.t1)

    r = built_once(root, name, build)
    with contextlib.redirect_stdout(io.StringIO()):
        cfg = lce.resolve_config(r["argv"])
    return SimpleNamespace(argv=r["argv"], out=cfg.OUTPUT_DIR, log=r["log"], cfg=cfg, t0=r["t0"], t1=r["t1"])


@pytest.fixture(scope="session")
def tiny_model_dir(shared_root):
    return built_once(shared_root, "tiny-sd", build_tiny_pipeline)


@pytest.fixture(scope="session")
def xl_model(shared_root):
    """The tiny SDXL-shaped pipeline (tests/tiny.py), built once for all workers."""
    return built_once(shared_root, "tiny-sdxl", build_tiny_sdxl_pipeline)


@pytest.fixture(scope="session")
def tiny_data_dir(shared_root):
    return built_once(shared_root, "shapes", build_tiny_dataset)


@pytest.fixture(scope="session")
def tiny_args(tiny_model_dir, tiny_data_dir):
    """tiny_args("--LORA_RANK=8", ...) -> the --NAME=value arguments of a tiny CPU run (TINY_RUN on the
    tiny model and data); the ones given replace or add to those."""

    def make(*extra):
        args = {k: f"--{k}={v}" for k, v in dict(MODEL_ID=tiny_model_dir, DATA_DIR=tiny_data_dir, **TINY_RUN).items()}
        args.update({a[2:].split("=", 1)[0]: a for a in extra})
        return list(args.values())

    return make


@pytest.fixture(scope="session")
def make_cfg(tiny_args):
    """make_cfg("--LORA_RANK=8", ...) -> a resolved Config on the tiny model and data."""
    return lambda *extra: lce.resolve_config(tiny_args(*extra))


@pytest.fixture
def load_tiny():
    """load_tiny(cfg, dtype=torch.float32) -> the script's StableDiffusion (sd.unet, sd.vae,
    sd.text_encoders, ...) of MODEL_ID, loaded and frozen as main does."""

    def load(cfg, dtype=torch.float32):
        sd = lce.load_models(cfg, lce.detect(cfg.MODEL_ID), dtype)
        lce.freeze(sd.unet, sd.vae, *sd.text_encoders)
        return sd

    return load


def collate_items(dataset, picks):
    """A batch as the training loop gets it: dataset items (index, flip, seed) through the script's collate."""
    return lce.collate([dataset[p] for p in picks])


@pytest.fixture(scope="session")
def two_loras(shared_root, tiny_args):
    """Two tiny LoRAs trained by the script: 'my_lora_model' (r=4, α=8, LOG_EVERY=1) and
    'my_second_lora_model' (r=8, α=4, another seed); the documents' examples load them by these names."""
    runs = {}
    for name, extra in (("my_lora_model", ["--LORA_RANK=4", "--LORA_ALPHA=8", "--LOG_EVERY=1"]),
                        ("my_second_lora_model", ["--LORA_RANK=8", "--LORA_ALPHA=4", "--SEED=7"])):
        runs[name] = shared_run(shared_root, name, lambda out, extra=extra: tiny_args(
            f"--OUTPUT_DIR={out}", "--MAX_TRAIN_STEPS=4", "--VALIDATION_PROMPTS=a red circle", *extra))
    return runs


@pytest.fixture(scope="session")
def rerun_of_first_lora(shared_root, two_loras):
    """The first small LoRA again, with settings that change no number of its training: files saved in
    fp16, metrics every 3 steps also to TensorBoard, and RESUME_FROM=latest in a folder whose only
    checkpoint is half-written (checkpoint-5/ without its state): it must start fresh."""
    pytest.importorskip("tensorboard")

    def argv_for(out):
        os.makedirs(os.path.join(out, "checkpoint-5"))
        argv = [a for a in two_loras["my_lora_model"].argv if not a.startswith(("--OUTPUT_DIR=", "--LOG_EVERY="))]
        return argv + [f"--OUTPUT_DIR={out}", "--SAVE_DTYPE=fp16", "--LOG_EVERY=3", "--REPORT_TO=tensorboard",
                       "--RESUME_FROM=latest"]

    return shared_run(shared_root, "rerun_of_first_lora", argv_for)


# The feature run: the text encoder trained too, LoRA+ with its own text-encoder rate, a cosine
# schedule with warm-up, a validation grid and a checkpoint at step 5, and the merged pipeline.
FEATURE_RUN = dict(STEPS=10, WARMUP=2, LR=1e-3, TE_LR=3e-4, RATIO=16.0, RANK=4, ALPHA=8)


@pytest.fixture(scope="session")
def feature_run(shared_root, tiny_args):
    r = FEATURE_RUN
    return shared_run(shared_root, "feature_run", lambda out: tiny_args(
        f"--OUTPUT_DIR={out}", "--TRAIN_TEXT_ENCODER=True", f"--MAX_TRAIN_STEPS={r['STEPS']}", "--CHECKPOINTING_STEPS=5",
        "--LR_SCHEDULER=cosine", f"--LR_WARMUP_STEPS={r['WARMUP']}", f"--LORAPLUS_LR_RATIO={r['RATIO']}",
        f"--LEARNING_RATE={r['LR']}", f"--TEXT_ENCODER_LEARNING_RATE={r['TE_LR']}", f"--LORA_RANK={r['RANK']}",
        f"--LORA_ALPHA={r['ALPHA']}", "--VALIDATION_STEPS=5", "--NUM_VALIDATION_SEEDS=2", "--SAVE_MERGED_MODEL=True",
        "--LOG_EVERY=1"))


@pytest.fixture(scope="session")
def demo_run(shared_root):
    """The demo as a user runs it (`python lora_complete_example.py --DEMO=True`, a subprocess): its 100
    training steps, with 2 sampler steps for its own pictures and report (the learning tests judge
    the LoRA with their own rendering). SimpleNamespace(argv, out, cfg, stdout, stderr)."""

    def build(out):
        argv = ["--DEMO=True", "--NUM_INFERENCE_STEPS=2", f"--OUTPUT_DIR={out}"]
        r = run_script(*argv)
        return dict(argv=argv, stdout=r.stdout, stderr=r.stderr)

    r = built_once(shared_root, "demo", build)
    with contextlib.redirect_stdout(io.StringIO()):
        cfg = lce.resolve_config(r["argv"])
    return SimpleNamespace(argv=r["argv"], out=cfg.OUTPUT_DIR, cfg=cfg, stdout=r["stdout"], stderr=r["stderr"])


def reference_unet(model_dir, folder, cfg):
    """The UNet a run's LoRA file describes, built without diffusers' LoRA loader: the base model,
    PEFT adapters made from the run's settings, the file's tensors put in."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    lce.freeze(unet)
    lce.add_lora(unet, cfg, cfg.TARGET_MODULES)
    sd = convert_unet_state_dict_to_peft({k[5:]: v for k, v in lora_weights(folder).items() if k.startswith("unet.")})
    result = set_peft_model_state_dict(unet, sd, adapter_name="default")
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora" in k], result
    return unet.eval()

