#!/usr/bin/env bash
# The benchmark suite on one CUDA GPU, in about five minutes: fp32/bf16/fp16, eager and compiled,
# the ≈90M config at a GPU-sized batch, ZeRO stages 0 and 2 at one rank, and step scaling.
#
#     bash bench/gpu.sh [OUT_DIR]      # default OUT_DIR: bench-gpu-results
#
# Writes OUT_DIR/bench.jsonl (one JSON line per figure) and OUT_DIR/tables.md, and prints both.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-gpu-results}"
mkdir -p "$out"
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh needs a CUDA GPU (torch.cuda.is_available() is False)")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

# Large batches keep the GPU busy; 8 timed steps x 3 rounds per loop after a warm-up.
timeout 330 python -m bench --device cuda --precisions bf16,fp16,fp32 --parts throughput,mfu,data,scaling \
    --batch-size 256 --mfu-batch-size 128 --steps 8 --rounds 3 | tee "$out/suite.txt"
timeout 150 python -m bench --device cuda --precisions bf16 --parts engine --engine-ranks 1 --engine-stages 0,2 \
    --engine-batch-size 256 --steps 8 --rounds 3 | tee "$out/engine.txt"

cat "$out/suite.txt" "$out/engine.txt" | grep '^{' > "$out/bench.jsonl"
cat "$out/suite.txt" "$out/engine.txt" | grep -v '^{' > "$out/tables.md"
echo "figures: $out/bench.jsonl, tables: $out/tables.md"
