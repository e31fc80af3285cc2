"""Several processes, as `accelerate launch --multi_gpu` runs the script on several GPUs: here two
CPU processes joined by gloo (conftest.start_script). The data folder holds four copies of one
captioned picture, unflipped, one image per process and step: both processes see the same data, so
the only difference between them is the noise and timesteps they draw.

  two    two processes, COMPILE=True, 4 steps, a checkpoint at step 2
  one    one process (in this process) with batches of 2: each step the same two examples, with the
         same seeds, as the two processes' batches of 1 together
  two_xl, one_xl   the same on the tiny SDXL-shaped pipeline (pooled prompt and size/crop ids travel with
         each example), 2 steps, half the captions dropped
  two_b, again_b   two processes on the SDXL-shaped pipeline in aspect-ratio buckets (with LoRA dropout),
         6 steps, and their resume from step 3

torch.compile gets its eager backend (a driver patches it before the script starts): the same
OptimizedModule wrapper as inductor, whose C++ build of the tiny UNet took 13 minutes on this CPU.
"""
import json
import os
import re

import pytest
import torch

import lora_complete_example as lce
from conftest import (WEBUI_NAME, capture_library_messages, finish, fresh_pipe, key_complaints, lora_weights, maxdiff,
                      pipe_outputs, python_driver, run_main, start_script)
from tiny import make_shape_image

STEPS = 4
SETTINGS = dict(RESOLUTION=64, MIXED_PRECISION="no", BATCH_SIZE=1, GRADIENT_ACCUMULATION_STEPS=1, RANDOM_FLIP=False,
                MAX_TRAIN_STEPS=STEPS, CHECKPOINTING_STEPS=2, LEARNING_RATE=1e-3, LOG_EVERY=1, NUM_INFERENCE_STEPS=2,
                NUM_VALIDATION_SEEDS=1, VALIDATION_PROMPTS="a red circle on a blue background")


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max(maxdiff(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, xl_model):
    root = tmp_path_factory.mktemp("processes")
    (root / "data").mkdir()
    for i in range(4):
        make_shape_image("red", "circle", "blue").save(root / "data" / f"{i}.png")
        (root / "data" / f"{i}.txt").write_text("a red circle on a blue background")
    args = [f"--MODEL_ID={tiny_model_dir}", f"--DATA_DIR={root / 'data'}", *(f"--{k}={v}" for k, v in SETTINGS.items())]
    driver = python_driver(root / "eager_compile.py", "import torch\n_compile = torch.compile\n"
                           "def compile_eager(model, *args, **kwargs):\n"
                           "    print(f'torch.compile({type(model).__name__})', flush=True)\n"
                           "    return _compile(model, backend='eager')\n"
                           "torch.compile = compile_eager")
    xl_args = [f"--MODEL_ID={xl_model}", *args[1:], "--CAPTION_DROPOUT=0.5"]
    xl_args = [a for a in xl_args if not a.startswith("--MAX_TRAIN_STEPS=")] + ["--MAX_TRAIN_STEPS=2"]
    two = start_script(*args, "--COMPILE=True", f"--OUTPUT_DIR={root / 'two'}", program=driver, launch=True)
    one = run_main(args + ["--BATCH_SIZE=2", f"--OUTPUT_DIR={root / 'one'}"])  # here, while the two processes start
    two = finish(two)
    two_xl = start_script(*xl_args, f"--OUTPUT_DIR={root / 'two_xl'}", launch=True)
    one_xl = run_main(xl_args + ["--BATCH_SIZE=2", f"--OUTPUT_DIR={root / 'one_xl'}"])
    two_xl = finish(two_xl)
    # an SDXL resume, in buckets: 10 pictures of three shapes at 128 px, 5 steps an epoch, resumed across its end
    (root / "mixed").mkdir()
    for i, size in enumerate([(128, 128)] * 4 + [(256, 128)] * 3 + [(128, 256)] * 3):
        make_shape_image(["red", "green", "blue"][i % 3], "circle", "yellow", size=size).save(root / "mixed" / f"{i}.png")
        (root / "mixed" / f"{i}.txt").write_text(f"a {['red', 'green', 'blue'][i % 3]} circle on a yellow background")
    b_args = [f"--MODEL_ID={xl_model}", f"--DATA_DIR={root / 'mixed'}", *args[2:], "--RESOLUTION=128",
              "--ASPECT_RATIO_BUCKETING=True",
              "--MAX_TRAIN_STEPS=6", "--CHECKPOINTING_STEPS=3", "--LORA_DROPOUT=0.1"]
    two_b = finish(start_script(*b_args, f"--OUTPUT_DIR={root / 'two_b'}", launch=True))
    again_b = finish(start_script(*b_args, f"--OUTPUT_DIR={root / 'again_b'}",
                                  f"--RESUME_FROM={root / 'two_b' / 'checkpoint-3'}", launch=True))
    runs = dict(two=two, one=one, two_xl=two_xl, one_xl=one_xl, two_b=two_b, again_b=again_b)
    return runs | {"out": {k: str(root / k) for k in runs}}


def test_two_compiled_processes_write_one_plain_file_that_diffusers_loads(runs, tiny_model_dir):
    log = runs["two"].stdout
    assert log.count("torch.compile(UNet2DConditionModel)") == 2  # COMPILE reached the UNet, in each process
    assert "effective batch 2 = 1 x 1 accumulation x 2 process(es)" in log
    assert log.count("reload check: saved file vs trained model") == 1 and log.count(f"trained {STEPS} steps") == 1  # rank 0 speaks
    out = runs["out"]["two"]
    written = sorted(os.path.relpath(os.path.join(root, n), out) for root, _, files in os.walk(out) for n in files
                     if n.endswith(".safetensors"))
    assert written == sorted([lce.WEIGHTS_NAME, WEBUI_NAME, os.path.join("checkpoint-2", lce.WEIGHTS_NAME)])
    for name in written:  # the plain UNet's names, not the compiled wrapper's
        keys = lora_weights(out, name).keys()
        assert keys and not [k for k in keys if "_orig_mod" in k], name
    with capture_library_messages() as messages:
        pipe = fresh_pipe(tiny_model_dir, out)
    assert key_complaints(messages) == [], messages
    assert maxdiff(pipe_outputs(pipe)[0], pipe_outputs(fresh_pipe(tiny_model_dir))[0]) > 1e-3  # the trained adapter


def test_a_checkpoint_keeps_each_processs_own_rng_states(runs):
    state = torch.load(os.path.join(runs["out"]["two"], "checkpoint-2", "training_state.pt"), map_location="cpu", weights_only=True)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def test_two_processes_train_exactly_like_one_with_twice_the_batch(runs):
    """Data-parallel training is a larger batch: the two processes' batches of one example each are, step
    by step, the one process's batch of two (the same examples, each with its own seed), and DDP averages
    their gradients as that batch's mean. Were the processes to draw the same noise, or see the same
    example, the weights would differ."""
    one, two = lora_weights(runs["out"]["one"]), lora_weights(runs["out"]["two"])
    assert "effective batch 2 = 2 x 1 accumulation x 1 process(es)" in runs["one"].log
    # rounding of the gradient all-reduce, amplified by Adam's g/√v where a gradient is near 0: measured up
    # to 2.7e-5 on an AMD EPYC; a real mismatch (same noise, same example) moves weights by ~lr = 1e-4
    assert max_abs_diff(one, two) <= 5e-5
    assert max_abs_diff(one, lora_weights(os.path.join(runs["out"]["one"], "checkpoint-2"))) > 1e-4  # and they trained


def test_two_sdxl_processes_train_exactly_like_one_with_twice_the_batch(runs):
    """The same on SDXL, whose examples also carry a pooled prompt and size/crop ids through the split.
    The losses and gradient norms agree to float precision; the weights to 1e-4, not 1e-5: at step 2 the
    lora_A gradients are tiny (B has only taken one step from zero) and Adam divides by their size."""
    assert "SDXL" in runs["one_xl"].log and "effective batch 2 = 1 x 1 accumulation x 2 process(es)" in runs["two_xl"].stdout
    metrics = [[json.loads(line) for line in open(os.path.join(runs["out"][k], "metrics.jsonl"))] for k in ("one_xl", "two_xl")]
    assert [m["step"] for m in metrics[0]] == [m["step"] for m in metrics[1]] == [1, 2]
    for a, b in zip(*metrics):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    one, two = lora_weights(runs["out"]["one_xl"]), lora_weights(runs["out"]["two_xl"])
    assert max_abs_diff(one, two) <= 1e-4
    assert max(v.abs().max() for k, v in one.items() if "lora.up" in k) > 1e-4  # B (up) starts at zero: they trained


def test_a_two_process_sdxl_resume_in_buckets_ends_with_the_weights_of_the_uninterrupted_run(runs):
    """Each process restores its own RNG states (LORA_DROPOUT's masks) and, in aspect-ratio buckets, takes
    every other one-bucket batch again: resumed at step 3 of 6 (5 steps an epoch), it ends where two_b did."""
    assert "SDXL" in runs["two_b"].stdout and "aspect-ratio buckets" in runs["two_b"].stdout
    assert "effective batch 2 = 1 x 1 accumulation x 2 process(es) | 5 steps/epoch" in runs["two_b"].stdout
    assert re.search(r"resumed from .*checkpoint-3 at step 3", runs["again_b"].stdout)
    assert "note:" not in runs["again_b"].stdout  # same settings, same number of processes: an exact continuation
    final = lora_weights(runs["out"]["two_b"])
    assert max_abs_diff(final, lora_weights(os.path.join(runs["out"]["two_b"], "checkpoint-3"))) > 1e-4
    assert max_abs_diff(final, lora_weights(runs["out"]["again_b"])) <= 1e-5
