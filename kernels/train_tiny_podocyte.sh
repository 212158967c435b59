#!/usr/bin/env bash
# The small trained checkpoint that 05_merging and the docs load: affmae_tiny pretrained on the four embedded
# podocyte TEM images (the package default data), 256² crops, on one GPU (about a minute on an H200).
# Usage (repository root): bash kernels/train_tiny_podocyte.sh OUT_DIR
# Writes OUT_DIR/affmae_tiny_podocyte.safetensors (the last checkpoint) and OUT_DIR/train_tiny_podocyte.log.
set -euo pipefail
out=${1:?usage: train_tiny_podocyte.sh OUT_DIR}
mkdir -p "$out"
python -c "import sys; from affmae.cli import main; sys.exit(main())" pretrain --arch affmae_tiny --img_size 256 \
  --bs 32 --epochs 12 --epoch_len 2048 --lr 1e-3 ${EXTRA:-} \
  --out "$out/run" --seed 0 2>&1 | tee "$out/train_tiny_podocyte.log"
cp "$(ls -t "$out"/run/checkpoints/*.safetensors | head -1)" "$out/affmae_tiny_podocyte.safetensors"
