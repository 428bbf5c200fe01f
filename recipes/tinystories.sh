#!/usr/bin/env bash
# The shipped TinyStories model, end to end: entropy model + θ calibration, BLT, bf16 export,
# held-out evaluation. One GPU; every step resumes if interrupted (add --resume by hand).
#
#   bash recipes/tinystories.sh                                   # TinyStories from the hub
#   DATA=data/train.txt.xz VALID=data/valid.txt.xz bash recipes/tinystories.sh   # local files
set -euo pipefail
DATA=${DATA:-train}
VALID=${VALID:-valid}
RUNS=${RUNS:-runs}
OUT=${OUT:-checkpoints}

python -m blt.train_entropy --data "$DATA" --valid-data "$VALID" \
  --dim 192 --layers 3 --heads 3 --window 512 \
  --steps "${ENT_STEPS:-1500}" --batch-size 32 --seq-len 512 --grad-accum 1 \
  --lr 2e-3 --min-lr 1e-4 --warmup 100 --eval-every 500 --save-every 500 \
  --target-bytes-per-patch 4.5 --out "$RUNS/entropy" ${COMPILE---compile}

python -m blt.train --data "$DATA" --valid-data "$VALID" \
  --config tinystories --entropy-model "$RUNS/entropy" \
  --steps "${BLT_STEPS:-2000}" --batch-size 32 --seq-len 2048 --grad-accum 1 \
  --lr 1.5e-3 --min-lr 1e-4 --warmup 200 --dropout 0.1 \
  --eval-every 250 --eval-batches 0 --save-every 500 --out "$RUNS/blt" ${COMPILE---compile}

python -m blt.export --checkpoint "$RUNS/blt/model" --out "$OUT" --dtype bf16
python -m blt.eval --checkpoint "$OUT" --data "$VALID"
