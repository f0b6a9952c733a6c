#!/usr/bin/env bash
# GPU speed of the paper's detector against torchvision's FasterRCNN built from the same parts
# (benchmarks/detector_speed.py): ResNet-101 C4 at 600x1000, 2 images per batch, bf16 autocast,
# ours channels-last, torchvision in its default layout and channels-last; training and
# inference images/s, ratio to torchvision and peak memory per model, then one summary line.
# Under 8 minutes on one recent GPU (20 timed steps per model after 5 warm-up).
#
#     bash benchmarks/gpu_bench.sh              # needs CUDA
#     bash benchmarks/gpu_bench.sh --dry-run    # the same script on the CPU, a tiny model, seconds
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--dry-run" ]]; then
    args=(--device cpu --depth 18 --width 8 --size 64x96 --batch 2 --iters 1 --warmup 0
          --proposals-test 16 --proposals-train 32 --roi-batch 16 --num-classes 3)
else
    if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        echo "gpu_bench.sh: no CUDA device (torch.cuda.is_available() is False); --dry-run runs on the CPU" >&2
        exit 2
    fi
    args=(--device cuda --depth 101 --size 600x1000 --batch 2 --iters 20 --warmup 5)
fi
exec python benchmarks/detector_speed.py "${args[@]}" --amp bf16 \
    --variants torchvision torchvision+cl ours --modes train infer
