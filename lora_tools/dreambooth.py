"""The mechanics behind lora_dreambooth_example.py (the ideas are in that script).

DreamBooth's prior preservation (Ruiz et al. 2023, Sec. 3.3) trains on the subject's images and, in the
same batches, on images of its class that the frozen base model drew itself: `class_images` makes
those once and reuses them, `PairedImages` pairs them with the subject's images and weighs them. Pivotal tuning trains
a new token's embedding (textual inversion, Gal et al. 2023) together with the LoRA: `token_names`,
`expand_token` and `save_embedding` follow the conventions diffusers' load_textual_inversion and the
WebUI/ComfyUI embeddings folders use.
"""
import glob
import os

import torch

from lora_tools.data import IMAGE_EXTENSIONS
from lora_tools.files import atomic_path


def list_images(folder):
    if not os.path.isdir(folder):
        return []
    return sorted(p for p in glob.glob(os.path.join(folder, "*")) if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS)


@torch.no_grad()
def class_images(folder, wanted, make_pipeline, draw, prompt, seed, show_progress=True, log=print):
    """`wanted` images of the class prompt in `folder`: the ones already there (made by an earlier run,
    or your own), plus as many new ones as are missing, drawn by draw(make_pipeline(), seed + i) for
    image i, so a rerun draws the same pictures. Returns the first `wanted` paths."""
    from tqdm.auto import tqdm

    have = list_images(folder)
    missing = wanted - len(have)
    if missing > 0:
        log(f"prior preservation: drawing {missing} class image(s) of {prompt!r} with the base model into {folder}")
        os.makedirs(folder, exist_ok=True)
        pipe = make_pipeline()
        for i in tqdm(range(len(have), wanted), desc="class images", disable=not show_progress):
            with atomic_path(os.path.join(folder, f"class-{i:05d}.png")) as tmp:
                draw(pipe, seed + i).save(tmp, format="PNG")
        del pipe
        have = list_images(folder)
    else:
        log(f"prior preservation: reusing {wanted} class image(s) of {prompt!r} from {folder}")
    return have[:wanted]


class PairedImages(torch.utils.data.Dataset):
    """Item (i, flip, seed): the subject's example i (mod their number) and the class example i (mod
    theirs), as the wrapped datasets give them, each with its weight in DreamBooth's loss (Ruiz et al.
    2023, Eq. 2: subject mean + λ·class mean). A batch of N pairs holds N subject and N class examples,
    and the training loop takes the mean over all 2N of (weight x loss): weights 2 and 2λ give exactly
    the subject mean plus λ times the class mean, also summed over micro-batches and processes."""

    def __init__(self, instance, prior, prior_loss_weight):
        self.instance, self.prior, self.prior_loss_weight = instance, prior, prior_loss_weight

    def __len__(self):
        return max(len(self.instance), len(self.prior))

    def __getitem__(self, item):
        i, flip, seed = item
        subject = self.instance[(i % len(self.instance), flip, seed)]
        klass = self.prior[(i % len(self.prior), flip, seed + 1)]  # its own random numbers
        return (dict(subject, loss_weight=torch.tensor(2.0)),
                dict(klass, loss_weight=torch.tensor(2.0 * self.prior_loss_weight)))


def token_names(token, n):
    """The tokenizer entries of an n-vector embedding, as diffusers names them: <t>, <t>_1, ... <t>_{n-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def expand_token(text, token, n):
    """A prompt as the text encoder must see it: the token stands for all its vectors (what diffusers'
    maybe_convert_prompt does at inference once load_textual_inversion has added them)."""
    return text.replace(token, " ".join(token_names(token, n)))


def save_embedding(path, tensors, dtype=torch.float32):
    """The learned vectors, {name: (n, d)}, as a safetensors file: SD 1.x's one tensor "emb_params", the
    file diffusers' load_textual_inversion(path, token=...) reads; SDXL's "clip_l" and "clip_g", one per
    text encoder (diffusers' advanced SDXL script's format). WebUI and ComfyUI read both kinds from
    their embeddings folder."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    if not all(torch.isfinite(v).all() for v in tensors.values()):
        raise ValueError(f"the learned embedding holds NaN/inf; {path} was not written")
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
