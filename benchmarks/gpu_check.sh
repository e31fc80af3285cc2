#!/usr/bin/env bash
# The GPU checks, in parts that each stop within 5 minutes (a lent GPU machine takes commands of at
# most 10 minutes; each part is cut off by `timeout` at 290 s and says so). Results go to $OUT (or
# ./bench_results).
#   part 1: the training-step benchmark on the SD1.5 architecture at 512 px, batch 1: (a) conventional,
#           (b) this script's default path, (c) the bare UNet step (3 fresh processes);
#   part 2: images/s, peak memory (allocated and reserved) and the UNet's model TFLOP/s of (b) for
#           batch 1, 4, 8, with and without gradient checkpointing (6 fresh processes);
#   part 3: the script end to end on the GPU (the demo): auto precision (bf16 where native), fp16 with
#           an fp32 VAE, text-encoder LoRA with alpha != rank, torch.compile, and 8-bit AdamW when
#           bitsandbytes is installed (skipped, saying so, when it is not);
#   part 4: the training-step benchmark on the SDXL base 1.0 architecture at 1024 px, batch 1, with and
#           without gradient checkpointing: (b) this script's default path and (c) the bare UNet step
#           (s/step, peak memory, the UNet's model TFLOP/s; 4 fresh processes).
# Usage: bash benchmarks/gpu_check.sh 1      (then 2, 3, 4; no argument runs all four in turn)
# Where the image lacks packages, put their wheels in .whl/ (pip download diffusers peft ... -d .whl).
set -u
OUT=${OUT:-bench_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ] && ! python3 -c "import diffusers, peft" 2>/dev/null; then
    python3 -m pip install -q --no-index --find-links .whl diffusers peft importlib_metadata 2>&1 | tail -n 2
fi
PARTS=${1:-"1 2 3 4"}
LIMIT=290  # seconds per part

part1() {
    python3 benchmarks/bench_train.py --MODELS=sd15 --RESOLUTION=512 --BATCH_SIZES=1 --OUTPUT="$OUT/bench_gpu_512_abc.json"
}
part2() {
    python3 benchmarks/bench_train.py --MODELS=sd15 --RESOLUTION=512 --MODES=b --BATCH_SIZES=1,4,8 \
        --GRADIENT_CHECKPOINTING=False,True --OUTPUT="$OUT/bench_gpu_512_sweep.json"
}
part4() {
    python3 benchmarks/bench_train.py --MODELS=sdxl --RESOLUTION=1024 --MODES=b,c --BATCH_SIZES=1 \
        --GRADIENT_CHECKPOINTING=False,True --OUTPUT="$OUT/bench_gpu_sdxl_1024.json"
}
part3() {
    local cases=("--MIXED_PRECISION=auto" "--MIXED_PRECISION=fp16 --VAE_FP32=True"
                 "--TRAIN_TEXT_ENCODER=True --LORA_ALPHA=8 --MAX_GRAD_NORM=0.5" "--COMPILE=True")
    if python3 -c "import bitsandbytes" 2>/dev/null; then
        cases+=("--USE_8BIT_ADAM=True")
    else
        echo "=== 8-bit AdamW skipped: bitsandbytes is not installed (pip install bitsandbytes)"
    fi
    for args in "${cases[@]}"; do
        name=$(echo "$args" | tr -c 'A-Za-z0-9\n' '_' | cut -c1-60)
        echo "=== demo $args"
        # shellcheck disable=SC2086
        timeout 120 python3 lora_complete_example.py --DEMO=True --OUTPUT_DIR="/tmp/gpu_demo_$name" $args 2>&1 \
            | tr '\r' '\n' | grep -v "it/s\]$" | tail -n 25
        echo "exit ${PIPESTATUS[0]}"
    done
}

python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers, peft, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/gpu.txt"
for p in $PARTS; do
    echo "##### part $p (at most $LIMIT s)"
    start=$(date +%s)
    export -f part1 part2 part3 part4
    export OUT
    timeout "$LIMIT" bash -c "part$p" 2>&1 | tee "$OUT/part$p.log"
    status=${PIPESTATUS[0]}
    [ "$status" = 124 ] && echo "part $p cut off after $LIMIT s: run it alone, or with fewer sizes"
    echo "##### part $p: exit $status after $(( $(date +%s) - start )) s"
done
