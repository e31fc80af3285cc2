"""
The pictures in the documents, made again from scratch:

    python docs/make_figures.py            # the two diagrams (a second) and the demo's pictures (the demo's time)
    python docs/make_figures.py --no-demo  # the diagrams only

docs/lora_bypass.png     a LoRA layer: the frozen W0 path beside the trainable A -> B -> x(α/r) branch, with shapes
docs/training_step.png   one training step: what runs, what is frozen, where the gradients go
docs/demo_*.png          comparison.png, loss_curve.png and rank_spectrum.png of `python lora_complete_example.py --DEMO=True`
"""
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FROZEN, TRAINED, DATA, LOSS = "#dfe6ee", "#ffcf8f", "#e8f3e0", "#f6d6d6"  # box colours


def box(ax, x, y, w, h, text, colour, size=11, bold=False):
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=colour, edgecolor="#333333", linewidth=1.2))
    ax.text(x, y, text, ha="center", va="center", fontsize=size, fontweight="bold" if bold else "normal")


def arrow(ax, start, end, text="", colour="#333333", style="-|>", dashed=False, offset=(0, 0.13)):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle=style, color=colour, lw=1.6,
                                                          linestyle="--" if dashed else "-", shrinkA=2, shrinkB=2))
    if text:
        ax.text((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1], text, ha="center",
                va="bottom", fontsize=9.5, color=colour)


def figure(width, height):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    return fig, ax


def lora_bypass(path):
    """h = W0·x + (α/r)·B·A·x, drawn for one attention projection of SD1.5 (d = 320, r = 4)."""
    from matplotlib.patches import Circle

    fig, ax = figure(10, 4.6)
    box(ax, 1.0, 2.3, 1.3, 0.8, "x\n(d_in = 320)", DATA)
    box(ax, 4.6, 3.5, 2.6, 0.9, "W0   (320 x 320)\nfrozen: 102,400 numbers", FROZEN)
    box(ax, 3.6, 1.1, 1.6, 0.9, "A   (4 x 320)\ntrained", TRAINED)
    box(ax, 5.7, 1.1, 1.6, 0.9, "B   (320 x 4)\ntrained, starts at 0", TRAINED, size=10)
    box(ax, 7.4, 1.1, 0.9, 0.7, "x α/r", TRAINED)
    ax.add_patch(Circle((8.3, 2.3), 0.28, facecolor="white", edgecolor="#333333", lw=1.2))
    ax.text(8.3, 2.3, "+", ha="center", va="center", fontsize=16)
    box(ax, 9.4, 2.3, 0.9, 0.8, "h\n(320)", DATA)
    arrow(ax, (1.65, 2.5), (3.3, 3.45))
    arrow(ax, (1.65, 2.1), (2.8, 1.2))
    arrow(ax, (5.9, 3.5), (8.1, 2.5), "W0·x")
    arrow(ax, (4.4, 1.1), (4.9, 1.1), "r = 4", offset=(0, 0.12))
    arrow(ax, (6.5, 1.1), (6.95, 1.1))
    arrow(ax, (7.85, 1.2), (8.08, 2.08))
    arrow(ax, (8.58, 2.3), (8.95, 2.3))
    ax.text(5.0, 4.35, "One LoRA layer (Hu et al. 2021, Eq. 3):   h = W0·x + (α/r)·B·A·x", ha="center", fontsize=13, fontweight="bold")
    ax.text(5.0, 0.22, "trained: A and B, 4·(320 + 320) = 2,560 numbers (2.5% of W0); B = 0 at the start, so the model starts exactly at W0",
            ha="center", fontsize=10, color="#444444")
    fig.savefig(path)


def training_step(path):
    """image -> VAE -> z0 -> + noise at t -> UNet + LoRA <- text encoder(caption) -> MSE -> gradients to A, B."""
    fig, ax = figure(12, 5.6)
    box(ax, 1.1, 4.3, 1.6, 0.9, "image x\n(3, 512, 512)", DATA)
    box(ax, 3.4, 4.3, 1.9, 0.9, "VAE encoder E\nfrozen", FROZEN)
    box(ax, 5.7, 4.3, 1.8, 0.9, "z0 = E(x)·0.18215\n(4, 64, 64)", DATA, size=10)
    box(ax, 5.7, 2.6, 1.8, 0.9, "noise ε ~ N(0, I)\nt ~ U{0..999}", DATA, size=10)
    box(ax, 8.0, 3.45, 2.1, 1.0, "z_t = √ᾱ_t·z0\n  + √(1-ᾱ_t)·ε", DATA, size=10)
    box(ax, 8.0, 1.3, 2.1, 1.1, "UNet εθ (frozen)\n+ LoRA A, B\n(trained)", TRAINED, size=10)
    box(ax, 1.1, 1.3, 1.6, 0.9, "caption y\n\"a purple ...\"", DATA, size=10)
    box(ax, 4.0, 1.3, 2.2, 0.9, "CLIP text encoder τθ\nfrozen: (77, 768)", FROZEN, size=10)
    box(ax, 10.9, 2.6, 1.7, 1.0, "loss\n‖ε − εθ(z_t, t, τθ(y))‖²", LOSS, size=10)
    arrow(ax, (1.9, 4.3), (2.45, 4.3))
    arrow(ax, (4.35, 4.3), (4.8, 4.3))
    arrow(ax, (6.6, 4.2), (7.3, 3.8))
    arrow(ax, (6.6, 2.75), (7.3, 3.15))
    arrow(ax, (8.0, 2.95), (8.0, 1.85), "z_t, t", offset=(0.45, -0.05))
    arrow(ax, (1.9, 1.3), (2.9, 1.3))
    arrow(ax, (5.1, 1.3), (6.95, 1.3), "cross-attention", offset=(0, 0.1))
    arrow(ax, (9.05, 1.5), (10.3, 2.1), "prediction ε̂", offset=(0.55, -0.45))
    arrow(ax, (6.6, 2.45), (10.05, 2.6), "target ε", offset=(-0.6, 0.02))
    arrow(ax, (10.9, 2.1), (9.05, 1.0), "gradients: A and B only", colour="#c0392b", dashed=True, offset=(0.5, -0.5))
    ax.text(6.0, 5.25, "One training step (DDPM Algorithm 1 and Eq. 14, in latent space)", ha="center", fontsize=13, fontweight="bold")
    ax.text(6.0, 0.25, "grey: frozen, never changes    orange: holds the trained LoRA    green: data    "
            "(with CACHE_LATENTS the frozen encoders run once, before training)", ha="center", fontsize=9.5, color="#444444")
    fig.savefig(path)


def demo_pictures():
    """Run the demo into a scratch folder and keep its three pictures."""
    out = os.path.join(ROOT, ".demo_cache", "figures_run")
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, os.path.join(ROOT, "lora_complete_example.py"), "--DEMO=True", f"--OUTPUT_DIR={out}"],
                   cwd=ROOT, check=True)
    for name in ("comparison.png", "loss_curve.png", "rank_spectrum.png"):
        shutil.copyfile(os.path.join(out, name), os.path.join(HERE, f"demo_{name}"))


if __name__ == "__main__":
    lora_bypass(os.path.join(HERE, "lora_bypass.png"))
    training_step(os.path.join(HERE, "training_step.png"))
    if "--no-demo" not in sys.argv[1:]:
        demo_pictures()
    print("wrote the pictures in", HERE)
