#!/usr/bin/env bash
# GPU smoke run: each tool for a few iterations on one GPU under torchrun (NCCL), on the
# built-in data, printing one line per tool (OK or FAIL with the last error line). Needs a CUDA
# machine; the CPU test suite never runs it.
#
#     bash benchmarks/gpu_smoke.sh [OUTPUT_FOLDER]      # default: a fresh temporary folder
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-$(mktemp -d)}"
export DETRES_CACHE="${DETRES_CACHE:-$out/cache}"
run="torchrun --standalone --nproc_per_node=1"
status=0

check() {  # check NAME COMMAND...: runs it, prints one line
    local name="$1"; shift
    local start=$SECONDS
    if "$@" > "$out/$name.log" 2>&1; then
        echo "OK    $name ($((SECONDS - start)) s) $(grep -E "done:|AP |err" "$out/$name.log" | tail -n 1 | cut -c1-100)"
    else
        status=1
        echo "FAIL  $name ($((SECONDS - start)) s): $(grep -v '^\s*$' "$out/$name.log" | tail -n 1 | cut -c1-160)"
    fi
}

common="train.device=cuda train.log_period=5 train.num_workers=2"
check pretrain_cls $run tools/pretrain_cls.py $common train.max_iter=20 train.eval_period=10 \
    train.amp=bf16 train.output_dir="$out/cls"
check train_det $run tools/train_det.py $common train.max_iter=20 train.eval_period=10 \
    train.amp=fp16 data.builtin.num_val=20 train.output_dir="$out/det"
check train_loc $run tools/train_loc.py train.device=cuda train.log_period=5 \
    classifier.max_iter=10 rpn.max_iter=10 rcnn.max_iter=10 data.builtin.num_val_per_class=2 \
    train.output_dir="$out/loc"
check eval_det $run tools/eval_det.py "$out/det/config.yaml" --weights "$out/det/model_final.pth"
check infer python tools/infer.py --weights "$out/det/model_final.pth" --device cuda \
    "$DETRES_CACHE"/shapes-*/val --out "$out/drawn"
echo "logs in $out"
exit $status
