"""
Sizes of the files a run writes for SD1.5 and SDXL (UNet LoRA), without training or downloading anything.

Builds each UNet on the meta device (no memory, instantly), adds LoRA exactly as the script does,
fills the LoRA tensors with zeros of the right shapes, and writes both files the script writes
(diffusers format with its metadata, and the WebUI/ComfyUI file) at each rank and SAVE_DTYPE.

    python benchmarks/file_sizes.py
"""
import contextlib
import io
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora_complete_example as lce  # noqa: E402
from lora_tools.family import SD1, SDXL  # noqa: E402
from lora_tools.kohya import kohya_metadata, save_kohya_file  # noqa: E402
from lora_tools.sd15 import sd15_unet  # noqa: E402
from lora_tools.sdxl import sdxl_unet  # noqa: E402


def main():
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = tempfile.mkdtemp(prefix="lora-sizes-")
    print(f"{'model':5} {'rank':>4} {'dtype':>5} {'params':>10} {'tensors':>7} {'diffusers file':>15} {'WebUI file':>12}")
    for name, family, build in (("sd15", SD1, sd15_unet), ("sdxl", SDXL, sdxl_unet)):
        for rank, dtype in ((4, "fp32"), (4, "fp16"), (8, "fp32"), (8, "fp16")):
            with contextlib.redirect_stdout(io.StringIO()):  # (the settings' "override:" lines)
                cfg = lce.resolve_config([f"--LORA_RANK={rank}", f"--LORA_ALPHA={rank}", f"--SAVE_DTYPE={dtype}"])
            unet = build("meta")
            unet.requires_grad_(False)
            lce.add_lora(unet, cfg, cfg.TARGET_MODULES)
            peft_sd = {k: torch.zeros(v.shape) for k, v in get_peft_model_state_dict(unet).items()}
            dt = lce.SAVE_DTYPES[dtype]
            tensors = {f"unet.{k}": v.to(dt) for k, v in convert_state_dict_to_diffusers(dict(peft_sd)).items()}
            diffusers_file = os.path.join(folder, f"{name}_r{rank}_{dtype}.safetensors")
            save_file(tensors, diffusers_file, metadata=lce.lora_metadata({"unet": unet}, cfg))
            webui_file = os.path.join(folder, f"{name}_r{rank}_{dtype}_webui.safetensors")
            info = dict(cfg.as_dict(), steps=1000, num_images=1000, started_at=0.0, finished_at=1.0)
            save_kohya_file(webui_file, {"unet": peft_sd}, {"unet": rank}, dict(family.webui),
                            kohya_metadata(info, family.webui_metadata), dt)
            n = sum(v.numel() for v in tensors.values())
            print(f"{name:5} {rank:4d} {dtype:>5} {n:10,d} {len(tensors):7d} {os.path.getsize(diffusers_file):13,d} B "
                  f"{os.path.getsize(webui_file):10,d} B")


if __name__ == "__main__":
    main()
