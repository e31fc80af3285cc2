"""Pretrain the demo's base model: a tiny text-to-image latent diffusion model of the shapes world.

    python -m lora_tools.demo_base --OUT_DIR=demo_base_new     # the shipped demo_base/: 56 min on a 2-core CPU
    python -m lora_tools.demo_base --STEPS=200     # a quick look (draws blobs)

It is built from the same classes as Stable Diffusion 1.x (CLIPTokenizer, CLIPTextModel, AutoencoderKL,
UNet2DConditionModel, DDPM/DDIM schedulers), only smaller, and saved in diffusers layout, so the demo
loads it with exactly the code that loads SD1.5. Training has two stages, as Stable Diffusion's had
(Rombach et al. 2022, Sec. 3): an autoencoder first (pixels 64x64x3 <-> latents 16x16x4), then the
text encoder and the UNet together with the denoising loss of lora_complete_example.py, on latents,
with 10% of the captions dropped so that classifier-free guidance works (Ho & Salimans 2022).

Its text encoder is a CLIPTextModel with no transformer layers: each word's vector is its token embedding
plus its position's, layer-normed, the same in every caption. A first version had two attention layers.
CLIP's text attention is causal (a token takes in only itself and the tokens before it), so the colour
word's own vector, the second word of every caption, was still the same wherever that colour appeared;
but the UNet had learned to read a shape's colour from the vectors *after* the colour word, which mix the
colour with the shape and the background. `python benchmarks/colour_probe.py` on the demo_base/ of commit
2078d88: swapping the colour word's vector alone gave 0% of pictures in the other colour, swapping the
vectors after it 77% (on this one: 100% and 0%). So what the demo's LoRA learned from purple circles and
squares sat in the vectors of "purple circle ..." and "purple square ...", not in those of "purple
triangle ...": it drew purple on 0% of the held-out purple pictures (on this base: 46%). Real CLIP was
trained on "400 million (image, text) pairs" (Radford et al. 2021, Sec. 2.2); that this gives a word a
meaning which carries over to new combinations is our hypothesis, not measured here.

At the end it prints how often the model draws what a prompt asks for, judged by
lora_tools.shapes.describe, on prompts it was trained on and on held-out combinations it never saw.
"""
import json
import math
import os
import random
import sys
import time

import torch

from lora_tools.config import UserError, parse_overrides
from lora_tools.shapes import COLOURS, NEW_COLOUR, SHAPES, SIZE, caption, draw, judge, score, split_base_world

OUT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo_base")
SEED = 0
IMAGES_PER_CAPTION = 60  # random sizes and places of each trained combination
VAE_STEPS = 4000  # autoencoder steps (batch 8 of 32x32 crops; the autoencoder is fully convolutional)
STEPS = 3200  # text encoder + UNet steps (batch 32)
BATCH_SIZE = 32
LEARNING_RATE = 5e-4
CAPTION_DROPOUT = 0.1  # train this fraction with the empty prompt: the unconditional model for guidance
SNR_GAMMA = 5.0  # Min-SNR-γ weighting (Hang et al. 2023)
EMA_DECAY = 0.999  # the saved weights are an exponential moving average of the trained ones
EVAL_EVERY = 1000  # steps between progress scores on the held-out prompts
GUIDANCE_SCALE = 4.0
NUM_INFERENCE_STEPS = 25
INIT_FROM = None  # a saved demo base to train further (stage 2 only, fresh optimizer); None = from scratch

WORDS = ["a", "on", "of", "background", "shape", "photo", *SHAPES, *COLOURS, NEW_COLOUR]  # one token each


def build_tokenizer():
    """A CLIP BPE tokenizer whose merges make each world word one token; any other word still
    tokenizes, letter by letter (as rare words do in SD's tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.train_from_iterator(WORDS, trainers.BpeTrainer(
        vocab_size=10_000, initial_alphabet=alphabet, special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>", show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    for c in alphabet:  # a letter at the end of a word
        vocab.setdefault(c + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in model["merges"]], model_max_length=77)
    split = [w for w in WORDS if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    assert not split, f"words not merged into one token: {split}"
    return tokenizer


def build_models(vocab_size):
    """VAE (4x downsampling, 0.2M), CLIP text encoder (0.04M: embeddings, no layers; see above) and UNet
    (1.5M), SD1.x's classes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=0, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=64, attention_head_dim=4)
    return vae, text_encoder, unet


def load_models(path):
    """A saved demo base (fp16 files), in fp32, to train further."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    load = lambda cls, sub: cls.from_pretrained(path, subfolder=sub, dtype=torch.float32)  # noqa: E731
    return (CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"), load(CLIPTextModel, "text_encoder"),
            load(AutoencoderKL, "vae"), load(UNet2DConditionModel, "unet"))


def schedulers():
    """SD1.x's noise schedule (scaled-linear β from 0.00085 to 0.012, T = 1000): DDPM for training,
    DDIM for sampling in a few steps."""
    from diffusers import DDIMScheduler, DDPMScheduler

    kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return DDPMScheduler(**kw), DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def to_pixels(images):
    """PIL images -> (N, 3, H, W) in [-1, 1]."""
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 127.5 - 1


def make_images(combos, per_caption, seed):
    """Pixels in [-1, 1] (N, 3, 64, 64) and captions for `per_caption` random drawings of each combination."""
    rng = random.Random(seed)
    images, captions = [], []
    for combo in combos:
        for _ in range(per_caption):
            images.append(draw(*combo, rng=rng))
            captions.append(caption(*combo))
    return to_pixels(images), captions


def random_colour_images(n, seed):
    """Shapes in random RGB colours: the autoencoder must represent any colour, not only the base world's
    five (as SD's VAE was trained on images of every kind), or no LoRA could teach a new one."""
    rng = random.Random(seed)
    colour = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731
    return to_pixels([draw(rng.choice(SHAPES), colour(), colour(), rng=rng) for _ in range(n)])


def train_vae(vae, pixels, steps, log, batch=8, crop=32):
    """Stage 1: the autoencoder, on random crops. Reconstruction (MSE) + a tiny KL term keeping the
    latents near N(0, I); one-cycle learning rate up to 2e-3 and down."""
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    vae.train()
    for step in range(1, steps + 1):
        i, j = (random.randrange(0, SIZE - crop + 1, 4) for _ in range(2))  # multiples of 4: whole latent pixels
        x = pixels[torch.randint(0, len(pixels), (batch,))][:, :, i:i + crop, j:j + crop]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps:
            log(f"  autoencoder step {step}/{steps}: reconstruction MSE {loss.item():.4f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def check_autoencoder(vae, combos, seed, log, what):
    """How often a picture, encoded and decoded, is still read as what it shows."""
    from PIL import Image

    pixels, _ = make_images(combos, 4, seed + 1)
    recon = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    images = [Image.fromarray(((x.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).round().byte().numpy()) for x in recon]
    s = score(images, [c for c in combos for _ in range(4)])
    log(f"  {what} pictures read correctly after encoding and decoding: {s['all']:.0%}")


@torch.no_grad()
def encode_all(vae, pixels):
    """Posterior mean and std of every picture, (N, 4, 16, 16) each."""
    means, stds = [], []
    for x in pixels.split(64):
        dist = vae.encode(x).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def pipeline(tokenizer, text_encoder, vae, unet, scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def evaluate(pipe, combos, seeds):
    pipe.set_progress_bar_config(disable=True)
    return judge(pipe, combos, seeds, NUM_INFERENCE_STEPS, GUIDANCE_SCALE)


def main(argv):
    defaults = {k: v for k, v in globals().items() if k.isupper() and k != "WORDS"}
    cfg = parse_overrides(argv, defaults)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    t0 = time.time()
    if os.path.exists(cfg["OUT_DIR"]):
        raise UserError(f"OUT_DIR={cfg['OUT_DIR']!r} exists — remove it or pick another --OUT_DIR; it is never overwritten")
    from diffusers.training_utils import EMAModel

    from lora_complete_example import StableDiffusion, compute_loss  # the very loss the LoRA runs train with
    from lora_tools.family import SD1

    torch.manual_seed(cfg["SEED"])
    train_combos, held_out = split_base_world(seed=cfg["SEED"])
    if cfg["INIT_FROM"]:
        tokenizer, text_encoder, vae, unet = load_models(cfg["INIT_FROM"])
    else:
        tokenizer = build_tokenizer()
        vae, text_encoder, unet = build_models(len(tokenizer))
    noise_scheduler, sampler = schedulers()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    log(f"base world: {len(SHAPES)} shapes x {len(COLOURS)} colours x {len(COLOURS)} backgrounds -> {len(train_combos)} "
        f"trained and {len(held_out)} held-out combinations; {NEW_COLOUR} is never shown")
    log(f"parameters: UNet {count(unet):,}, text encoder {count(text_encoder):,}, VAE {count(vae):,}")

    random.seed(cfg["SEED"])
    pixels, captions = make_images(train_combos, cfg["IMAGES_PER_CAPTION"], cfg["SEED"])
    if not cfg["INIT_FROM"]:
        log(f"stage 1: autoencoder on {len(pixels)} base-world pictures and {len(pixels) // 3} in random colours")
        train_vae(vae, torch.cat([pixels, random_colour_images(len(pixels) // 3, cfg["SEED"] + 1)]), cfg["VAE_STEPS"], log)
    mean, std = encode_all(vae, pixels)
    if not cfg["INIT_FROM"]:
        check_autoencoder(vae, held_out, cfg["SEED"], log, "held-out base-world")
        check_autoencoder(vae, [(s, NEW_COLOUR, b) for s in SHAPES for b in COLOURS], cfg["SEED"], log, NEW_COLOUR)
        vae.register_to_config(scaling_factor=round(1.0 / mean.std().item(), 5))  # unit-variance latents, as SD's 0.18215
    log(f"  latent scaling factor {vae.config.scaling_factor} ({time.time() - t0:.0f}s)")

    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids  # (1, 77)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = EMAModel(params, decay=cfg["EMA_DECAY"])
    opt = torch.optim.AdamW(params, lr=cfg["LEARNING_RATE"], weight_decay=1e-2)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(s, cfg["STEPS"]) / cfg["STEPS"])))

    def with_ema(fn):
        ema.store(params)
        ema.copy_to(params)
        try:
            return fn()
        finally:
            ema.restore(params)

    pipe = pipeline(tokenizer, text_encoder, vae, unet, sampler)
    sd = StableDiffusion(SD1, (tokenizer,), (text_encoder,), vae, unet, noise_scheduler, vae.config.scaling_factor,
                         pipe.vae_scale_factor)
    log(f"stage 2: text encoder + UNet, {cfg['STEPS']} steps of {cfg['BATCH_SIZE']}")
    unet.train(), text_encoder.train()
    running = []
    for step in range(1, cfg["STEPS"] + 1):
        idx = torch.randint(0, len(ids), (cfg["BATCH_SIZE"],))
        input_ids = ids[idx].clone()
        input_ids[torch.rand(len(idx)) < cfg["CAPTION_DROPOUT"]] = empty[0]
        seeds = torch.randint(0, 2**62, (len(idx),)).tolist()  # each example's noise, from the run's seed
        batch = {"latent_mean": mean[idx], "latent_std": std[idx], "input_ids": input_ids[:, None], "seed": seeds}
        loss = compute_loss(batch, sd, snr_gamma=cfg["SNR_GAMMA"]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        running.append(loss.item())
        if step % 100 == 0:
            log(f"  step {step}/{cfg['STEPS']}: loss {sum(running) / len(running):.4f} ({time.time() - t0:.0f}s)")
            running = []
        if step % cfg["EVAL_EVERY"] == 0 and step < cfg["STEPS"]:
            unet.eval(), text_encoder.eval()
            s = with_ema(lambda: evaluate(pipe, held_out, [0, 1]))
            log(f"  held-out prompts drawn fully right: {s['all']:.0%} (shape {s['shape']:.0%}, colour {s['colour']:.0%}, background {s['background']:.0%})")
            unet.train(), text_encoder.train()
    ema.copy_to(params)
    unet.eval(), text_encoder.eval()

    tmp = cfg["OUT_DIR"] + ".partial"
    pipe.to(torch.float16).save_pretrained(tmp)  # fp16 files: half the size; loaded back in fp32
    os.replace(tmp, cfg["OUT_DIR"])
    log(f"saved {cfg['OUT_DIR']} ({time.time() - t0:.0f}s)")
    report_quality(cfg["OUT_DIR"], train_combos, held_out, log)
    log(f"done in {(time.time() - t0) / 60:.1f} min")


def report_quality(path, train_combos, held_out, log=print, seeds=(0, 1, 2, 3)):
    """Score the saved model, loaded as a user loads it, on trained and held-out prompts."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    for name, combos in (("held-out", held_out), ("trained", train_combos[::5])):
        s = evaluate(pipe, combos, list(seeds))
        log(f"{name} prompts ({len(combos)} x {len(seeds)} seeds): drawn fully right {s['all']:.0%} "
            f"(shape {s['shape']:.0%}, colour {s['colour']:.0%}, background {s['background']:.0%})")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
