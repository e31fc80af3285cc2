"""Reading captioned images: a local folder or a `datasets` dataset, real-world files included.

`to_rgb` turns whatever PIL opened (grayscale, palette, RGBA, CMYK, 16-bit, EXIF-rotated) into the
8-bit RGB picture a person would see. `read_folder` lists a folder's images with their captions
(metadata.jsonl / metadata.csv as `datasets`' imagefolder reads them, or same-name .txt files).
"""
import contextlib
import csv
import json
import os
import re

from .config import UserError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
IMAGE_COLUMN_GUESSES = ("image", "img", "images", "file_name", "path")
CAPTION_COLUMN_GUESSES = ("text", "caption", "captions", "prompt", "title", "description", "label")


def to_rgb(img):
    """Any PIL image -> 8-bit RGB, as it looks on screen."""
    import numpy as np
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)  # a phone photo's pixels are stored sideways; EXIF says how to turn them
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: rescale, don't clip at 255
        a = np.asarray(img, dtype=np.float64)
        # 16-bit modes span 0..65535; mode "I" (32-bit) says nothing about its range, so guess from the data
        peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "RGBa", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":  # composite on white: convert("RGB") would show whatever hides under alpha = 0
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")


def open_image(path):
    """Open and fully decode one image file (so a truncated file fails here, not mid-training)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return to_rgb(im)


def picture_size(img):
    """(width, height) of a picture as it looks on screen (EXIF orientation applied), from its file's
    header or an unloaded PIL image: nothing is decoded (the check at loading decoded it once)."""
    from PIL import Image

    with (Image.open(img) if isinstance(img, str) else contextlib.nullcontext(img)) as im:
        width, height = im.size
        turned = im.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF Orientation: stored a quarter turn away
    return (height, width) if turned else (width, height)


def _read_metadata(folder):
    for name in ("metadata.jsonl", "metadata.csv"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        else:
            with open(path, encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f))
        return path, rows
    return None, None


def pick_column(columns, wanted, guesses, what, setting):
    """The column named `wanted`, or the first of `guesses` present; a clear error otherwise."""
    if wanted is not None:
        if wanted not in columns:
            raise UserError(f"{setting}={wanted!r} is not a column of the data; the columns are {sorted(columns)} — set --{setting}=<one of them>")
        return wanted
    for g in guesses:
        if g in columns:
            return g
    raise UserError(f"could not tell which column holds the {what}; the columns are {sorted(columns)} — set --{setting}=<one of them>")


KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya's "<repeats>_<name>": train each image <repeats> times an epoch


def read_folder(folder, caption_column=None, log=print, captions_needed=True):
    """[(image_path, caption)] for a local folder, sorted by path, one record per example of an epoch:
    an image in a kohya-style subfolder `<repeats>_<name>/` (e.g. 10_dog/) appears <repeats> times.
    Captions come from metadata.jsonl/.csv, else a same-name .txt or .caption file (kohya's two). Non-image
    files are ignored; images without a caption train with an empty one, said in one line (not said when
    captions_needed=False: with INSTANCE_PROMPT a folder of bare images is the usual case)."""
    if not os.path.isdir(folder):
        raise UserError(f"DATA_DIR={folder!r} is not a folder — point --DATA_DIR at a folder of images")
    meta_path, rows = _read_metadata(folder) if captions_needed else (None, None)
    captions = {}
    if rows is not None:
        columns = set().union(*(r.keys() for r in rows)) if rows else set()
        if "file_name" not in columns:
            raise UserError(f"{meta_path} has no 'file_name' column (it has {sorted(columns)}); imagefolder metadata names each image in 'file_name'")
        cap_col = pick_column(columns - {"file_name"}, caption_column, CAPTION_COLUMN_GUESSES, "captions", "CAPTION_COLUMN")
        for r in rows:
            captions[os.path.normpath(os.path.join(folder, r["file_name"]))] = str(r.get(cap_col) or "")
    records, uncaptioned, kohya_folders = [], [], {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.normpath(os.path.join(root, name))
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            if path in captions:
                caption = captions[path]
            else:
                caption = None
                for ext in (".txt", ".caption"):
                    if caption is None and os.path.isfile(os.path.splitext(path)[0] + ext):
                        with open(os.path.splitext(path)[0] + ext, encoding="utf-8") as f:
                            caption = f.read().strip()
            if not caption:
                uncaptioned.append(os.path.relpath(path, folder))
                caption = ""
            top = os.path.relpath(path, folder).split(os.sep)[0]
            kohya = KOHYA_FOLDER.match(top) if top != os.path.relpath(path, folder) else None
            if kohya:
                kohya_folders.setdefault(top, []).append(path)
            records += [(path, caption)] * (int(kohya.group(1)) if kohya else 1)
    records.sort()
    if kohya_folders:
        log("kohya-style folders <repeats>_<name>, each image trained <repeats> times an epoch: " + ", ".join(
            f"{name} ({len(paths)} x {KOHYA_FOLDER.match(name).group(1)})" for name, paths in sorted(kohya_folders.items())))
    if uncaptioned and captions_needed:
        names = ", ".join(sorted(uncaptioned)[:3]) + (f" and {len(uncaptioned) - 3} more" if len(uncaptioned) > 3 else "")
        log(f"note: {len(uncaptioned)} image(s) in {folder} have no caption and train with an empty one: {names}")
    if not records:
        raise UserError(f"DATA_DIR={folder!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) — check the path")
    return records


class HubImages:
    """Lazy view of a `datasets` dataset's image column: decodes one row when asked, so memory does not
    grow with the number of images (the Arrow table itself is memory-mapped from the cache on disk).
    rows: which rows, in order (e.g. those whose image could be read); None = all."""

    def __init__(self, dataset, column, rows=None):
        self.dataset, self.column = dataset.select_columns([column]), column
        self.rows = list(range(len(dataset))) if rows is None else list(rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.dataset[self.rows[int(i)]][self.column]

    def select(self, kept):
        """The view of only these items (indices into this view)."""
        return HubImages(self.dataset, self.column, [self.rows[i] for i in kept])
