#!/usr/bin/env bash
# One GPU session, prepared to run as a single short command (results under $OUT, or ./bench_results):
#   1. the training-step benchmark on the SD1.5 architecture at 512 px: (a) conventional, (b) this
#      script's default path, (c) the bare UNet step, batch 1;
#   2. images/s, peak VRAM and the UNet's TFLOP/s of (b) for batch 1, 4, 8, with and without
#      gradient checkpointing;
#   3. the script end to end on the GPU (DEMO model): auto precision (bf16), fp16 with an fp32 VAE,
#      text-encoder LoRA with alpha != rank, 8-bit AdamW (bitsandbytes), torch.compile.
# Usage: bash benchmarks/gpu_check.sh      (needs an NVIDIA GPU; about 5 minutes on an H200)
set -u
OUT=${OUT:-bench_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers, peft, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/gpu.txt"

python3 benchmarks/bench_train.py --MODELS=sd15 --RESOLUTION=512 --BATCH_SIZES=1 --OUTPUT="$OUT/bench_gpu_512_abc.json" 2>&1 | tee "$OUT/bench_gpu_512_abc.log"
python3 benchmarks/bench_train.py --MODELS=sd15 --RESOLUTION=512 --MODES=b --BATCH_SIZES=1,4,8 \
    --GRADIENT_CHECKPOINTING=False,True --OUTPUT="$OUT/bench_gpu_512_sweep.json" 2>&1 | tee "$OUT/bench_gpu_512_sweep.log"

for args in "--MIXED_PRECISION=auto" "--MIXED_PRECISION=fp16 --VAE_FP32=True" \
            "--TRAIN_TEXT_ENCODER=True --LORA_ALPHA=8 --MAX_GRAD_NORM=0.5" "--USE_8BIT_ADAM=True" "--COMPILE=True"; do
    name=$(echo "$args" | tr -c 'A-Za-z0-9\n' '_' | cut -c1-60)
    { echo "=== demo $args"; timeout 240 python3 lora_complete_example.py --DEMO=True --OUTPUT_DIR="/tmp/gpu_demo_$name" $args 2>&1 \
        | grep -v -i "warn" | tr '\r' '\n' | grep -v "it/s\]$" | tail -n 30; echo "exit ${PIPESTATUS[0]}"; } >> "$OUT/demo.log"
done
grep -E "^(=== |exit )" "$OUT/demo.log"
