"""Aspect-ratio buckets (ASPECT_RATIO_BUCKETING): train each picture near its own shape, not a square crop.

kohya's scheme, which SDXL's authors also used (Podell et al. 2023, Sec. 2.3: "we keep the pixel count as
close to 1024² pixels as possibly, varying height and width accordingly in multiples of 64"):
- the buckets are (height, width) pairs with sides multiples of `step` (64: the latent must divide by the
  UNet's downsampling), from resolution/2 to 2·resolution, each as large as fits in resolution² pixels;
- a picture goes to the bucket whose aspect ratio is nearest its own (in log ratio); it is resized to
  cover the bucket and cropped to it (centre, or random), so at most a sliver is cut, not a third;
- a picture smaller than resolution² is not scaled up: its bucket is its own size, rounded down to `step`
  (kohya's bucket_no_upscale); with upscale=True it goes to a full-size bucket like any other;
- every batch holds pictures of one bucket (their latents must stack), the batches in a random order.

    table = bucket_table(512)                     [(256, 1024), ..., (512, 512), ..., (1024, 256)]
    sizes = [pick_bucket(w, h, 512) for w, h in picture_sizes]
    BucketBatches(EpochShuffle(n, seed, flip), sizes, batch_size, seed)   a DataLoader's batch_sampler
"""
import math
from collections import Counter

import torch


def bucket_table(resolution, step=64):
    """[(height, width)] of every bucket: sides multiples of `step` in [resolution/2, 2·resolution], the
    largest height for each width with height·width <= resolution²."""
    low, high = max(step, resolution // 2 // step * step), 2 * resolution
    table = set()
    for width in range(low, high + 1, step):
        height = min(high, resolution * resolution // width // step * step)
        if height >= low:
            table |= {(height, width), (width, height)}
    return sorted(table)


def pick_bucket(width, height, resolution, step=64, upscale=False):
    """(height, width) of the bucket for a picture of this size: the nearest aspect ratio; a picture of
    fewer than resolution² pixels keeps its size, rounded down to `step`, unless `upscale`."""
    if width * height < resolution * resolution and not upscale:
        return max(step, height // step * step), max(step, width // step * step)
    ratio = math.log(width / height)
    return min(bucket_table(resolution, step), key=lambda b: (abs(math.log(b[1] / b[0]) - ratio), -b[0] * b[1]))


def describe_buckets(sizes):
    """One line: each bucket and how many pictures it holds, the largest first."""
    counts = Counter(sizes)
    return ", ".join(f"{h}x{w}: {n}" for (h, w), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


class BucketBatches(torch.utils.data.Sampler):
    """A DataLoader's batch sampler: the epoch's examples as `sampler` (EpochShuffle) orders them, with
    their flips and seeds, grouped by bucket in that order, cut into batches of `batch_size` (the last of
    a bucket may be smaller), the batches in an order drawn from (seed, epoch). A pure function of
    (seed, epoch), like EpochShuffle, so a resumed run replays exactly the same batches."""

    def __init__(self, sampler, sizes, batch_size, seed):
        self.sampler, self.sizes, self.batch_size, self.seed = sampler, list(sizes), batch_size, seed

    def __iter__(self):
        groups = {}
        for item in self.sampler:
            groups.setdefault(self.sizes[item[0]], []).append(item)
        batches = [group[i:i + self.batch_size] for group in groups.values()
                   for i in range(0, len(group), self.batch_size)]
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.sampler.epoch + 1)
        return iter([batches[i] for i in torch.randperm(len(batches), generator=g).tolist()])

    def __len__(self):
        return sum(math.ceil(n / self.batch_size) for n in Counter(self.sizes).values())
