"""
Training-step benchmark: what does a LoRA step cost, and how much of it is waste?

Measures, in one run on the current device (GPU if visible, else CPU), three ways to train the
same LoRA on the same model, each in a fresh process (so time to first step and peak memory are
its own):
  (a) conventional: decode images and run the frozen VAE + text encoder at every step
      (what diffusers' train_text_to_image_lora.py does);
  (b) this project's default path: lora_complete_example.py's functions with CACHE_LATENTS=True
      (encode once, then train on cached latents and embeddings);
  (c) the floor: the bare UNet LoRA forward + backward + AdamW step on ready tensors;
  (t) (b) with SHUFFLE_CAPTION_TAGS: latents cached, the prompt tokenized and encoded at every step
      (what tag shuffling costs; only with --MODES=...,t).
For each: median seconds per optimizer step, images/s, peak memory while training (on a GPU what
tensors held, torch.cuda.max_memory_allocated, and what the caching allocator reserved,
max_memory_reserved; on a CPU the process's peak RSS), the caching phase's peak on its own, time to
first step (model on device -> first step done, caching included), and the UNet's achieved TFLOP/s
(model FLOPs of one forward + backward, counted once with torch's FlopCounterMode and without
gradient checkpointing, so the recomputation it adds is not counted as useful work).
Prints a table with the ratios (a)/(b), (b)/(c) and (t)/(b) and writes JSON.

    python benchmarks/bench_train.py                                 # SD1.5 at 512 px, batch 1
    python benchmarks/bench_train.py --MODELS=sd15 --RESOLUTION=256  # SD1.5 architecture at 256 px
    python benchmarks/bench_train.py --MODELS=sd15 --MODES=b --BATCH_SIZES=1,4,8 --GRADIENT_CHECKPOINTING=False,True
    python benchmarks/bench_train.py --MODELS=sdxl --RESOLUTION=1024 --MODES=b,c --GRADIENT_CHECKPOINTING=False,True
    python benchmarks/bench_train.py --MODELS=sdxl --RESOLUTION=256 --MODES=b,c   # SDXL on a CPU
    python benchmarks/bench_train.py --MODELS=sd15 --RESOLUTION=256 --MODES=b,t   # what tag shuffling costs

The SD1.5 and SDXL base 1.0 architectures are built from their published configs with random weights
(no download): the compute is the real one, the weights don't matter for speed.
"""
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lora_tools.config import UserError, parse_overrides  # noqa: E402

# -----------------------------------------------------------------------------
MODELS = ["sd15"]  # sd15 / sdxl = the SD1.5 / SDXL base 1.0 architecture, random weights
MODES = ["a", "b", "c"]  # a = conventional, b = this script's default, c = bare UNet step
RESOLUTION = 512  # pixels
BATCH_SIZES = [1]  # images per step; each is measured
GRADIENT_CHECKPOINTING = [False]  # each value is measured
MIXED_PRECISION = "auto"  # as in the script: auto = bf16/fp16 on a GPU, fp32 on a CPU
STEPS = None  # timed optimizer steps per measurement; None = 10 on a GPU, 3 on a CPU
WARMUP = None  # untimed steps first; None = 3 on a GPU, 1 on a CPU
LORA_RANK = 4
OUTPUT = os.path.join(ROOT, "bench_results", "bench_train.json")  # the JSON results
WORKER = ""  # internal: one measurement's spec, as JSON (the parent process sets it)
# -----------------------------------------------------------------------------
CONFIG_KEYS = [k for k in list(globals()) if k.isupper() and k not in ("ROOT",)]


def peak_memory(cuda):
    """(allocated, reserved) peak bytes since the last reset on a GPU; (peak RSS, None) on a CPU."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        peaks = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        torch.cuda.reset_peak_memory_stats()
        return peaks
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, None  # Linux reports KiB


def build_models(model, device, weight_dtype, vae_dtype):
    """The script's StableDiffusion (tokenizers, text encoders, VAE, UNet, noise scheduler) of the SD1.5 or
    SDXL architecture — frozen, on device, in weight_dtype (the VAE in vae_dtype)."""
    import torch
    from diffusers import DDPMScheduler

    import lora_complete_example as lce
    from lora_tools.family import SD1, SDXL
    from lora_tools.sd15 import sd15_text_encoder, sd15_tokenizer, sd15_unet, sd15_vae
    from lora_tools.sdxl import sdxl_text_encoders, sdxl_unet, sdxl_vae

    if model not in ("sd15", "sdxl"):
        raise UserError(f"MODELS: unknown model {model!r} — the benchmark measures 'sd15' and 'sdxl'")
    with torch.random.fork_rng(devices=[]):  # initialise directly on the device: random init of 1B parameters on a CPU is slow
        if model == "sd15":
            family, text_encoders, vae, unet = SD1, (sd15_text_encoder(device),), sd15_vae(device), sd15_unet(device)
        else:
            family, text_encoders, vae, unet = SDXL, sdxl_text_encoders(device), sdxl_vae(device), sdxl_unet(device)
    # the same DDPM schedule for both (their scheduler configs agree)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    for m in (*text_encoders, unet):
        m.requires_grad_(False).to(device, dtype=weight_dtype)
    vae.requires_grad_(False).to(device, dtype=vae_dtype)
    tokenizers = (sd15_tokenizer(),) * len(text_encoders)  # a stand-in BPE tokenizer: ids are all speed needs
    return lce.StableDiffusion(family, tokenizers, text_encoders, vae, unet, scheduler, vae.config.scaling_factor, 8)


def ready_inputs(unet, bs, h, device, dtype):
    """z_t, t, the UNet's conditioning and a target: random tensors of the right shapes (mode c)."""
    import torch

    cond = {"encoder_hidden_states": torch.randn(bs, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled prompt + size/crop ids
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        size = torch.tensor([[8 * h, 8 * h, 0, 0, 8 * h, 8 * h]], device=device, dtype=torch.float32)
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(bs, pooled, device=device, dtype=dtype),
                                     "time_ids": size.expand(bs, 6)}
    return dict(z=torch.randn(bs, 4, h, h, device=device), t=torch.randint(0, 1000, (bs,), device=device),
                cond=cond, target=torch.randn(bs, 4, h, h, device=device))


def make_images(folder, n, resolution):
    import random

    from lora_tools.shapes import caption, combinations, draw

    combos, rng = combinations(), random.Random(0)
    paths, captions = [], []
    for i in range(n):
        path = os.path.join(folder, f"{i:03d}.png")
        draw(*combos[i % len(combos)], rng=rng, size=resolution).save(path)
        paths.append(path)
        captions.append(caption(*combos[i % len(combos)]))
    return paths, captions


def count_unet_flops(unet, sample, t, cond):
    """Model FLOPs of one UNet forward + backward (matmuls, convolutions, attention), counted with
    gradient checkpointing off: its recomputed forward is extra work, not useful work."""
    from torch.utils.flop_counter import FlopCounterMode

    checkpointing = unet.is_gradient_checkpointing
    if checkpointing:
        unet.disable_gradient_checkpointing()
    counter = FlopCounterMode(display=False)
    with counter:
        unet(sample, t, **cond, return_dict=False)[0].float().square().mean().backward()
    for p in unet.parameters():
        p.grad = None
    if checkpointing:
        unet.enable_gradient_checkpointing()
    return counter.get_total_flops()


def measure(spec):
    """One (model, mode, batch, checkpointing) measurement, in this process."""
    import torch
    from accelerate import Accelerator

    import lora_complete_example as lce

    cuda = torch.cuda.is_available()
    if not cuda:  # the script's host-memory policy on a CPU, for every mode alike
        from lora_tools.machine import keep_host_memory

        keep_host_memory()
    steps = spec["steps"] or (10 if cuda else 3)
    warmup = spec["warmup"] if spec["warmup"] is not None else (3 if cuda else 1)
    bs, res, mode = spec["batch_size"], spec["resolution"], spec["mode"]
    mixed_precision = lce.resolve_mixed_precision(spec["mixed_precision"], cuda)
    weight_dtype = lce.DTYPES[mixed_precision]
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    # fp16: the SDXL VAE overflows, so fp32 as the script keeps it (force_upcast in its config)
    vae_dtype = torch.float32 if weight_dtype == torch.float16 and spec["model"] == "sdxl" else weight_dtype
    sd = build_models(spec["model"], device, weight_dtype, vae_dtype)
    unet = sd.unet
    cfg = lce.resolve_config([f"--RESOLUTION={res}", f"--BATCH_SIZE={bs}", "--GRADIENT_ACCUMULATION_STEPS=1",
                              f"--LORA_RANK={spec['lora_rank']}", f"--LORA_ALPHA={spec['lora_rank']}",
                              f"--CACHE_LATENTS={mode in ('b', 't')}", f"--SHUFFLE_CAPTION_TAGS={mode == 't'}",
                              f"--GRADIENT_CHECKPOINTING={spec['gradient_checkpointing']}",
                              "--RANDOM_FLIP=True", "--DATALOADER_NUM_WORKERS=0"], )
    lora_params = lce.add_lora(unet, cfg, cfg.TARGET_MODULES)
    if cfg.GRADIENT_CHECKPOINTING:
        unet.enable_gradient_checkpointing()
    unet.train()
    folder = tempfile.mkdtemp(prefix="bench-images-")
    paths, captions = make_images(folder, bs * (warmup + steps), res)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not cuda)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    optimizer = lce.make_optimizer(lce.lora_param_groups([(unet, cfg.LEARNING_RATE)], cfg), cfg, cuda)
    caching_peak = None
    if mode == "c":  # ready tensors: z_t, t, c and the target, made once
        ready = ready_inputs(unet, bs, res // 8, device, weight_dtype)
        sd.vae = sd.text_encoders = None
        unet, optimizer = accelerator.prepare(unet, optimizer)
        batches = None
    else:
        dataset = lce.CaptionedImages(paths, lce.tokenize(sd.tokenizers, captions), cfg)
        if mode in ("b", "t"):
            dataset = lce.cache_latents(dataset, sd, cfg, show_progress=False)
            sd.vae = None
            if mode == "b":
                sd.text_encoders = (None,) * len(sd.text_encoders)
            else:  # the prompt in a new order every step: tokenized and encoded in the step
                dataset = lce.ShuffledTags(dataset, captions, sd.tokenizers, keep=1)
            if cuda:
                torch.cuda.empty_cache()
            caching_peak = peak_memory(cuda)[0]  # and, on a GPU, the training peak starts from here
        loader = torch.utils.data.DataLoader(dataset, batch_size=bs, sampler=lce.EpochShuffle(len(dataset), 0, True),
                                             pin_memory=cuda, collate_fn=lce.collate)
        unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
        sd.unet = unet
        batches = iter(loader)

    times = []
    for i in range(warmup + steps):
        t_step = time.perf_counter()
        if batches is None:  # (c) the floor
            pred = unet(ready["z"], ready["t"], **ready["cond"], return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred.float(), ready["target"])
            accelerator.backward(loss)
        else:  # (a) and (b): the script's own step
            batch = next(batches)
            loss = lce.compute_loss(batch, sd).mean()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(lora_params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if i == 0:
            first_step = now - t0
        if i >= warmup:
            times.append(now - t_step)
    peak, reserved = peak_memory(cuda)
    bare = accelerator.unwrap_model(unet, keep_torch_compile=False)
    x = ready_inputs(bare, bs, res // 8, device, weight_dtype)  # FLOPs at this shape, counted once (untimed)
    with accelerator.autocast():
        flops = count_unet_flops(bare, x["z"], x["t"], x["cond"])
    sec = statistics.median(times)
    return dict(spec, device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                mixed_precision=mixed_precision, steps=steps, warmup=warmup, sec_per_step=sec,
                images_per_sec=bs / sec, peak_memory_gb=peak / 1e9, peak_reserved_gb=reserved and reserved / 1e9,
                caching_peak_gb=caching_peak and caching_peak / 1e9, time_to_first_step=first_step,
                step_times=times, unet_flops_per_step=flops, loss=float(loss))


def run_sweep(c):
    results = []
    for model in c["MODELS"]:
        for gc_on in c["GRADIENT_CHECKPOINTING"]:
            for bs in c["BATCH_SIZES"]:
                for mode in c["MODES"]:
                    spec = dict(model=model, mode=mode, batch_size=bs, resolution=c["RESOLUTION"],
                                gradient_checkpointing=gc_on, mixed_precision=c["MIXED_PRECISION"],
                                steps=c["STEPS"], warmup=c["WARMUP"], lora_rank=c["LORA_RANK"])
                    print(f"measuring {spec} ...", flush=True)
                    proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--WORKER={json.dumps(spec)}"],
                                          capture_output=True, text=True, cwd=ROOT)
                    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                    if proc.returncode != 0 or not line:
                        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                        raise SystemExit(f"measurement failed: {spec}")
                    results.append(json.loads(line[-1][len("RESULT "):]))
    return results


def table(results):
    """Rows per (model, batch, checkpointing) with the ratios (a)/(b) and (b)/(c)."""
    groups = {}
    for r in results:
        groups.setdefault((r["model"], r["batch_size"], r["gradient_checkpointing"]), {})[r["mode"]] = r
    gpu = any(r["peak_reserved_gb"] for r in results)
    peak_name = "alloc GB" if gpu else "RSS GB"  # GPU: max_memory_allocated; CPU: peak resident set
    lines = [f"{'model':6} {'res':>4} {'bs':>3} {'ckpt':>5} {'mode':5} {'s/step':>9} {'img/s':>8} {peak_name:>8} "
             + (f"{'resv GB':>8} " if gpu else "") + f"{'cache GB':>8} {'1st step s':>10} {'TFLOP/s':>8}"]
    for (model, bs, gc_on), modes in groups.items():
        for m in ("a", "b", "c", "t"):
            if m not in modes:
                continue
            r = modes[m]
            tflops = f"{r['unet_flops_per_step'] / r['sec_per_step'] / 1e12:8.2f}"
            cache = f"{r['caching_peak_gb']:8.2f}" if r["caching_peak_gb"] else f"{'-':>8}"
            lines.append(f"{model:6} {r['resolution']:4d} {bs:3d} {str(gc_on):>5} {m:5} {r['sec_per_step']:9.4f} "
                         f"{r['images_per_sec']:8.2f} {r['peak_memory_gb']:8.2f} "
                         + (f"{r['peak_reserved_gb']:8.2f} " if gpu else "") + f"{cache} {r['time_to_first_step']:10.2f} {tflops}")
        ratio = []
        if "a" in modes and "b" in modes:
            ratio.append(f"(a)/(b) = {modes['a']['sec_per_step'] / modes['b']['sec_per_step']:.2f}x faster per step; "
                         f"peak memory (b)/(a) = {modes['b']['peak_memory_gb'] / modes['a']['peak_memory_gb']:.2f}")
        if "b" in modes and "c" in modes:
            ratio.append(f"(b)/(c) = {modes['b']['sec_per_step'] / modes['c']['sec_per_step']:.3f}x the floor")
        if "t" in modes and "b" in modes:
            ratio.append(f"(t)/(b) = {modes['t']['sec_per_step'] / modes['b']['sec_per_step']:.3f}x per step "
                         f"(the prompt encoded every step)")
        if ratio:
            lines.append("       " + " | ".join(ratio))
    return "\n".join(lines)


def main(argv):
    c = parse_overrides(argv, {k: globals()[k] for k in CONFIG_KEYS})
    if c["WORKER"]:
        print("RESULT " + json.dumps(measure(json.loads(c["WORKER"]))), flush=True)
        return
    results = run_sweep(c)
    report = table(results)
    print("\n" + report)
    os.makedirs(os.path.dirname(c["OUTPUT"]), exist_ok=True)
    with open(c["OUTPUT"], "w") as f:
        json.dump({"results": results, "table": report, "python": sys.version.split()[0]}, f, indent=2)
    print(f"\nwrote {c['OUTPUT']}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
