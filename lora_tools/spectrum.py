"""A look inside a trained adapter: how many directions does each LoRA update ΔW = scaling·B·A use?

    updates = lora_updates(unet)            # {module name: ΔW}, read from PEFT's LoRA layers
    rows, text = spectrum_table(updates)    # energy in the top-k singular directions, per UNet block
    (pictures.save_spectrum_plot(rows, "out/rank_spectrum.png") draws the rows)
"""
import math
import re
from collections import OrderedDict

import torch


@torch.no_grad()
def lora_updates(model, adapter_name="default"):
    """{module name: ΔW} for every PEFT LoRA Linear layer of `model`, in fp32 on the layer's device.
    LoRA (Hu et al. 2021, Eq. 3): h = W0·x + scaling·B·A·x, so ΔW = scaling·B·A. `scaling` is PEFT's
    own: α/r, or α/√r with use_rslora, times any scale set later (set_adapters weights)."""
    from peft.tuners.lora import LoraLayer

    updates = OrderedDict()
    for name, module in model.named_modules():
        if not (isinstance(module, LoraLayer) and adapter_name in module.lora_A
                and isinstance(module.get_base_layer(), torch.nn.Linear)):
            continue  # conv LoRA too: its ΔW is a 4-d kernel, not one matrix
        if adapter_name in getattr(module, "lora_magnitude_vector", {}):  # DoRA's learned magnitudes
            raise ValueError(f"{name} uses DoRA: its update also rescales the columns of W0, so it is not "
                             "scaling·B·A — this analysis covers plain LoRA only")
        a, b = module.lora_A[adapter_name].weight.float(), module.lora_B[adapter_name].weight.float()  # (r, in), (out, r)
        updates[name] = module.scaling[adapter_name] * (b @ a)  # (out, in), rank <= r
    return updates


def singular_energy(delta):
    """Share of ‖ΔW‖_F² = Σσ_i² held by each singular direction, largest first (sums to 1).
    ΔW = 0 (a fresh adapter, B = 0) has no direction: an empty tensor."""
    energy = torch.linalg.svdvals(delta.detach().float()).double() ** 2
    return energy / energy.sum() if energy.sum() > 0 else energy[:0]


def block_group(name):
    """Group key of a module name: UNet block and attention kind, e.g. 'down_blocks.1 attn2' (attn1 =
    self-attention, attn2 = cross-attention to the text); text-encoder layers as 'layers.3'; anything
    else by its parent module."""
    block = re.search(r"(?:^|\.)((?:down_blocks|up_blocks|layers)\.\d+|mid_block)(?:\.|$)", name)
    kind = re.search(r"\.(attn[12])(?:\.|$)", name)
    if block is None:
        return name.rpartition(".")[0] or name
    return f"{block[1]} {kind[1]}" if kind else block[1]


def _group_order(key):
    """down blocks, then the mid block, then up blocks (named_modules lists mid after up)."""
    head, _, index = key.split(" ")[0].partition(".")
    return {"down_blocks": 0, "mid_block": 1, "up_blocks": 2, "layers": 3}.get(head, 4), int(index) if index.isdigit() else 0, key


def spectrum_table(updates, group=block_group, directions=None):
    """Per group of LoRA updates: the mean share of ΔW's energy in its top 1, 2, ..., K singular
    directions (K = `directions`, by default the largest numerical rank found, <= r) and the mean
    effective rank. Returns (rows, text); a row is a dict of group, matrices, zero (ΔW = 0, left out
    of the means), cumulative (cumulative[k-1] = share in the top k) and effective_rank."""
    profiles = OrderedDict()  # group -> list of energy vectors (None for ΔW = 0)
    for name, delta in updates.items():
        energy = singular_energy(delta)
        profiles.setdefault(group(name), []).append(energy if len(energy) else None)
    if directions is None:  # numerical rank: directions above 1e-10 of the energy (fp32 noise is ~1e-14)
        directions = max([int((e > 1e-10).sum()) for es in profiles.values() for e in es if e is not None], default=1)
    rows = []
    for key in sorted(profiles, key=_group_order):
        live = [e for e in profiles[key] if e is not None]
        row = dict(group=key, matrices=len(profiles[key]), zero=len(profiles[key]) - len(live),
                   cumulative=[float("nan")] * directions, effective_rank=float("nan"))
        if live:  # cumulative energy, padded with 1.0 past a matrix's last direction
            cum = [torch.cat([e.cumsum(0), e.new_ones(directions)])[:directions] for e in live]
            row["cumulative"] = torch.stack(cum).mean(0).tolist()
            # effective rank = exp(entropy) of the energy shares σ²/Σσ²: 1 for rank 1, r for r equal σ; an
            # energy-weighted variant of Roy & Vetterli's (2007), which take σ/‖σ‖₁
            row["effective_rank"] = sum(math.exp(-sum(p * math.log(p) for p in e.tolist() if p > 0)) for e in live) / len(live)
        rows.append(row)
    # the text: one line per group, energy columns at k = 1 ... K (K <= 8) or 1, 2, 4, ..., K
    ks = list(range(1, directions + 1)) if directions <= 8 else sorted({2 ** i for i in range(directions.bit_length())} | {directions})
    width = max([len("group")] + [len(r["group"]) for r in rows])
    head = f"{'group':<{width}}  {'n':>3}  " + "  ".join(f"{'top-' + str(k):>7}" for k in ks) + "  eff. rank"
    lines = ["share of |dW|_F^2 in the top-k singular directions (mean over the group's matrices)", head,
             "-" * len(head)]
    for r in rows:
        if r["zero"] == r["matrices"]:
            cells, erank = "  ".join(f"{'-':>7}" for _ in ks), "all zero (untrained, B = 0)"
        else:
            cells = "  ".join(f"{100 * r['cumulative'][k - 1]:>6.1f}%" for k in ks)
            erank = f"{r['effective_rank']:9.2f}" + (f"  ({r['zero']} zero)" if r["zero"] else "")
        lines.append(f"{r['group']:<{width}}  {r['matrices']:>3}  {cells}  {erank}")
    return rows, "\n".join(lines)
