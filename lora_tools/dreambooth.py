"""The mechanics behind the script's DreamBooth and pivotal-tuning blocks (the ideas are in the script).

DreamBooth's prior preservation (Ruiz et al. 2023, Sec. 3.3) trains on the subject's images and, in the
same batches, on images of its class that the frozen base model drew itself: `class_images` makes
those once and reuses them, `PairedImages` pairs them with the subject's images. Pivotal tuning trains
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
    """Item (i, flip): the subject's example i (mod their number) and the class example i (mod
    theirs), both as the wrapped datasets give them, as a pair; `collate_pairs` stacks a batch of
    pairs into one batch of 2B: the B subject examples first, then their B class examples."""

    def __init__(self, instance, prior):
        self.instance, self.prior = instance, prior

    def __len__(self):
        return max(len(self.instance), len(self.prior))

    def __getitem__(self, item):
        i, flip = item if isinstance(item, tuple) else (item, False)
        return self.instance[(i % len(self.instance), flip)], self.prior[(i % len(self.prior), flip)]


def collate_pairs(pairs):
    from torch.utils.data import default_collate

    instance, prior = default_collate([p[0] for p in pairs]), default_collate([p[1] for p in pairs])
    batch = {k: torch.cat([instance[k], prior[k]]) for k in instance}
    batch["is_prior"] = torch.tensor([False] * len(pairs) + [True] * len(pairs))
    return batch


def token_names(token, n):
    """The tokenizer entries of an n-vector embedding, as diffusers names them: <t>, <t>_1, ... <t>_{n-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def expand_token(text, token, n):
    """A prompt as the text encoder must see it: the token stands for all its vectors (what diffusers'
    maybe_convert_prompt does at inference once load_textual_inversion has added them)."""
    return text.replace(token, " ".join(token_names(token, n)))


def save_embedding(path, vectors, dtype=torch.float32):
    """The learned vectors (n, d) as one safetensors tensor named "emb_params": the file diffusers'
    load_textual_inversion(path, token=...) reads, and that WebUI and ComfyUI read from their embeddings folder."""
    from safetensors.torch import save_file

    vectors = vectors.detach().to("cpu", dtype).contiguous()
    if not torch.isfinite(vectors).all():
        raise ValueError(f"the learned embedding holds NaN/inf; {path} was not written")
    with atomic_path(path) as tmp:
        save_file({"emb_params": vectors}, tmp, metadata={"format": "pt"})
