"""Shared fixtures: a tiny SD-shaped pipeline and dataset built once per session, helpers to load
them through the script's own functions, and one real in-process training run (lce.main) with
spies on its models and its gradient clipping, reused by several test files."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread (here and in the scripts run as subprocesses, which inherit it): the tiny
# models gain nothing from more, and OpenMP threads competing for 2 busy cores can make each op
# hundreds of times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import inspect  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import lora_complete_example as lce  # noqa: E402
from lora_tools.demo import build_tiny_dataset, build_tiny_pipeline  # noqa: E402

SCRIPT = os.path.join(REPO_ROOT, "lora_complete_example.py")


# ----------------------------------------------------------------------------- helpers
def subprocess_env():
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("RANK", None)
    return env


def loss_of(batch, unet, noise_scheduler, vae=None, text_encoder=None, scaling_factor=None):
    """Call lce.compute_loss by parameter name, whatever order its signature uses."""
    if scaling_factor is None:
        scaling_factor = vae.config.scaling_factor
    available = dict(batch=batch, unet=unet, noise_scheduler=noise_scheduler, scaling_factor=scaling_factor,
                     vae=vae, text_encoder=text_encoder)
    params = inspect.signature(lce.compute_loss).parameters
    unknown = [n for n, p in params.items() if n not in available and p.default is inspect.Parameter.empty]
    assert not unknown, f"compute_loss has required parameters the tests do not know: {unknown}"
    return lce.compute_loss(**{n: available[n] for n in params if n in available})


def total_grad_norm(params):
    grads = [p.grad.detach().float() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


def fixed_unet_inputs(unet, seed=2024, batch=2, size=8):
    """A fixed UNet input, independent of the script's own helper."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    c = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([37, 613][:batch] + [500] * max(0, batch - 2))
    return z, t, c


@contextmanager
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


def collate(items):
    return torch.utils.data.default_collate(list(items))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def _reset_accelerate_state():
    """Accelerator() keeps process-wide state; each test may create its own (fp32 or bf16)."""
    yield
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_pipeline(str(tmp_path_factory.mktemp("models") / "tiny-sd"))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    return build_tiny_dataset(str(tmp_path_factory.mktemp("data") / "shapes"))


@pytest.fixture(scope="session")
def make_cfg(tiny_model_dir, tiny_data_dir):
    """make_cfg("--LORA_RANK=8", ...) -> a resolved Config on the tiny model and data."""

    def make(*extra):
        base = [f"--MODEL_ID={tiny_model_dir}", f"--DATA_DIR={tiny_data_dir}", "--RESOLUTION=64",
                "--MIXED_PRECISION=no", "--BATCH_SIZE=4", "--GRADIENT_ACCUMULATION_STEPS=1"]
        return lce.resolve_config(base + list(extra))

    return make


@pytest.fixture
def load_tiny():
    """load_tiny(cfg, dtype=torch.float32) -> frozen (tokenizer, text_encoder, vae, unet, scheduler)."""

    def load(cfg, dtype=torch.float32, vae_dtype=None):
        tok, te, vae, unet, sched = lce.load_models(cfg, dtype, dtype if vae_dtype is None else vae_dtype)
        lce.freeze(te, vae, unet)
        return tok, te, vae, unet, sched

    return load


def pixel_batch(cfg, tokenizer, indices=None, flip=False):
    """Pixels + token ids of the given images (all by default), through the script's dataset."""
    images, captions = lce.load_captioned_images(cfg)
    ds = lce.CaptionedImages(images, lce.tokenize(tokenizer, captions), cfg)
    indices = range(len(ds)) if indices is None else indices
    return collate(ds[(i, flip)] for i in indices)


# The in-process training run shared by test_training_run.py: alpha != rank, gradient
# accumulation, a small MAX_GRAD_NORM so that clipping really acts, a high learning rate.
TRAIN_RUN = dict(LORA_RANK=4, LORA_ALPHA=8, MAX_GRAD_NORM=0.01, LEARNING_RATE=1e-2, MAX_TRAIN_STEPS=40,
                 BATCH_SIZE=2, GRADIENT_ACCUMULATION_STEPS=2, LOSS_SEED=1234)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    """Run lce.main in this process on the tiny model, recording (through spies on load_models,
    add_lora and Accelerator.clip_grad_norm_) the models it trains, the pretrained weights as
    loaded, the fixed-batch loss before training and every clipping call."""
    from accelerate import Accelerator

    out = str(tmp_path_factory.mktemp("trained") / "out")
    argv = [f"--MODEL_ID={tiny_model_dir}", f"--DATA_DIR={tiny_data_dir}", f"--OUTPUT_DIR={out}",
            "--RESOLUTION=64", "--MIXED_PRECISION=no", "--RANDOM_FLIP=True", "--CACHE_LATENTS=True",
            f"--LORA_RANK={TRAIN_RUN['LORA_RANK']}", f"--LORA_ALPHA={TRAIN_RUN['LORA_ALPHA']}",
            f"--MAX_GRAD_NORM={TRAIN_RUN['MAX_GRAD_NORM']}", f"--LEARNING_RATE={TRAIN_RUN['LEARNING_RATE']}",
            f"--MAX_TRAIN_STEPS={TRAIN_RUN['MAX_TRAIN_STEPS']}", f"--BATCH_SIZE={TRAIN_RUN['BATCH_SIZE']}",
            f"--GRADIENT_ACCUMULATION_STEPS={TRAIN_RUN['GRADIENT_ACCUMULATION_STEPS']}",
            "--LOG_EVERY=10", "--NUM_INFERENCE_STEPS=2", "--VALIDATION_PROMPT=a red circle"]
    rec = SimpleNamespace(argv=argv, output_dir=out, clip_calls=[], add_lora_calls=0)
    real_load, real_add, real_clip = lce.load_models, lce.add_lora, Accelerator.clip_grad_norm_

    def load_spy(cfg, weight_dtype, vae_dtype):
        models = real_load(cfg, weight_dtype, vae_dtype)
        rec.tokenizer, rec.text_encoder, rec.vae, rec.unet, rec.scheduler = models
        # the pretrained weights exactly as loaded, before freeze / LoRA / training
        rec.pretrained = {f"{part}.{n}": p.detach().clone()
                          for part, m in (("unet", models[3]), ("vae", models[2]), ("text_encoder", models[1]))
                          for n, p in m.named_parameters()}
        return models

    def add_spy(unet, cfg):
        params = real_add(unet, cfg)
        rec.add_lora_calls += 1
        rec.cfg = cfg
        rec.lora_params = list(params)
        rec.lora_initial = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
        rec.fixed_batch = pixel_batch(cfg, rec.tokenizer)  # all 8 images, unflipped
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(TRAIN_RUN["LOSS_SEED"])
            rec.loss_before = loss_of(rec.fixed_batch, unet, rec.scheduler, rec.vae, rec.text_encoder).item()
        return params

    def clip_spy(self, parameters, max_norm, norm_type=2):
        params = list(parameters)
        pre = total_grad_norm(params) if params else 0.0
        result = real_clip(self, params, max_norm, norm_type)
        rec.clip_calls.append(dict(param_ids=[id(p) for p in params], given_type=type(parameters),
                                   max_norm=max_norm, pre=pre, post=total_grad_norm(params) if params else 0.0,
                                   returned=float(result), sync=self.sync_gradients))
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lce, "load_models", load_spy)
        mp.setattr(lce, "add_lora", add_spy)
        mp.setattr(Accelerator, "clip_grad_norm_", clip_spy)
        try:
            lce.main(argv)
            rec.main_error = None
        except Exception as e:  # recorded, asserted by test_main_completes_with_alpha_not_rank
            rec.main_error = e
        finally:
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(True)
            GradientState._reset_state()
    assert hasattr(rec, "unet") and hasattr(rec, "lora_params"), f"main failed before training: {rec.main_error!r}"
    rec.unet.eval()
    return rec
