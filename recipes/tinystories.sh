#!/usr/bin/env bash
# The shipped TinyStories model, end to end: entropy model + θ calibration, BLT (optionally
# pretrained on general text first), bf16 export, held-out evaluation. One GPU. Run it again
# after an interruption (a signal, a crash, a full disk): finished stages are skipped (their
# model/ folder exists) and an interrupted one continues from its checkpoint (--resume).
#
#   bash recipes/tinystories.sh                                    # TinyStories from the hub
#   DATA=data/tinystories/train.txt.xz VALID=data/tinystories/valid.txt.xz \
#     PRETRAIN=data/mix bash recipes/tinystories.sh                # local files, as shipped
#
# DATA, VALID and PRETRAIN take a file, folder or glob (quoted, so that blt.data expands it), e.g.
# DATA='data/tinystories/train*.txt.xz' for the training file and its extra stories together.
# PRETRAIN (optional): general text. The BLT first trains on it for
# PRE_STEPS steps (default 3000), then fine-tunes on DATA from those weights (--init-from) for
# BLT_STEPS steps (default 2600). The shipped model used a folder holding the general English
# mix and a copy of the TinyStories training file. Also: RUNS (runs), OUT (checkpoints),
# BATCH (16), ACCUM (2), ENT_STEPS (1500), LOG_EVERY (a metrics row every 10 steps).
# Variants of the model: CONFIG (the BLT's shape: a preset or a config JSON; default tinystories),
# ENT_FLAGS (more blt.train_entropy flags, e.g. ENT_FLAGS="--dim 256 --layers 4 --heads 4" for a
# larger entropy model), ENTROPY (an entropy model already trained, e.g. another run's
# RUNS/entropy, used instead of training one: variants that share it differ only in the BLT).
# python -m blt.plot_metrics RUNS/blt OTHER_RUNS/blt --table compares the runs.
# More flags: BLT_FLAGS go to every BLT training, PRE_FLAGS to the pretraining only, FT_FLAGS to
# the training on DATA only; they come after the recipe's own, so they win (e.g.
# FT_FLAGS="--dropout 0.3", BLT_FLAGS="--ema 0.995").
# Execution: blt.train's defaults (blt.execution; on one GPU the whole step as one graph, fused
# products, a bf16 residual stream, entropies computed once), which BLT_FLAGS can change (e.g.
# BLT_FLAGS=--compile: each block compiled instead). Peak GPU memory of the BLT at BATCH=16
# ACCUM=2 on an H100: 3.2 GiB with --one-graph, 3.2 GiB with --compile (BATCH=32 ACCUM=1, the
# same global batch: 6.2 GiB with --compile). bench/journeys.py runs this recipe with short steps.
# GPUS=N (default 1) trains the BLT on N GPUs with DDP (torchrun; BATCH is per GPU): keep
# BATCH x ACCUM x GPUS at 32 for the shipped global batch, e.g. GPUS=2 ACCUM=1.
set -euo pipefail
DATA=${DATA:-train}
VALID=${VALID:-valid}
PRETRAIN=${PRETRAIN:-}
CONFIG=${CONFIG:-tinystories}
ENT_FLAGS=${ENT_FLAGS:-}
ENTROPY=${ENTROPY:-}
RUNS=${RUNS:-runs}
OUT=${OUT:-checkpoints}
BATCH=${BATCH:-16}
ACCUM=${ACCUM:-2}
BLT_FLAGS=${BLT_FLAGS:-}
PRE_FLAGS=${PRE_FLAGS:-}
FT_FLAGS=${FT_FLAGS:-}
GPUS=${GPUS:-1}
if [ "$GPUS" -gt 1 ]; then
  TRAIN_BLT=(python -m torch.distributed.run --standalone --nproc_per_node "$GPUS" -m blt.train --dist ddp)
else
  TRAIN_BLT=(python -m blt.train)
fi

# stage OUT CMD...: skip CMD when OUT/model is complete, add --resume when OUT has a checkpoint
stage() {
  local out=$1
  shift
  if [ -f "$out/model/config.json" ] || [ -f "$out/model/entropy_config.json" ]; then
    echo "recipe: $out/model exists, skipping this stage"
    return
  fi
  if [ -d "$out/checkpoint" ]; then
    set -- "$@" --resume
  fi
  "$@"
}

if [ -n "$ENTROPY" ]; then
  echo "recipe: using the entropy model in $ENTROPY"
else
  ENTROPY=$RUNS/entropy
  stage "$ENTROPY" python -m blt.train_entropy --data "$DATA" --valid-data "$VALID" \
    --dim 128 --layers 2 --heads 2 --window 512 \
    --steps "${ENT_STEPS:-1500}" --batch-size 32 --seq-len 512 --grad-accum 1 \
    --lr 2e-3 --min-lr 1e-4 --warmup 100 --eval-every 500 --save-every 500 \
    --target-bytes-per-patch 4.5 $ENT_FLAGS --out "$ENTROPY"
fi

blt() {  # blt OUT STAGE_FLAGS FLAGS...: the recipe's FLAGS, then BLT_FLAGS, then the stage's own
  local out=$1 stage_flags=$2
  shift 2
  stage "$out" "${TRAIN_BLT[@]}" --valid-data "$VALID" --config "$CONFIG" --entropy-model "$ENTROPY" \
    --batch-size "$BATCH" --grad-accum "$ACCUM" --seq-len 2048 --min-lr 1e-4 \
    --eval-every 250 --eval-batches 0 --save-every 500 --log-every "${LOG_EVERY:-10}" "$@" $BLT_FLAGS $stage_flags \
    --out "$out"
}
if [ -n "$PRETRAIN" ]; then
  blt "$RUNS/pretrain" "$PRE_FLAGS" --data "$PRETRAIN" --steps "${PRE_STEPS:-3000}" --lr 1.5e-3 --warmup 200 \
    --dropout 0.1
  blt "$RUNS/blt" "$FT_FLAGS" --data "$DATA" --init-from "$RUNS/pretrain/model" --steps "${BLT_STEPS:-2600}" \
    --lr 1e-3 --warmup 100 --dropout 0.2 --seed 1
else
  blt "$RUNS/blt" "$FT_FLAGS" --data "$DATA" --steps "${BLT_STEPS:-2200}" --lr 1.5e-3 --warmup 200 --dropout 0.1
fi

python -m blt.export --checkpoint "$RUNS/blt/model" --out "$OUT" --dtype bf16
python -m blt.eval --checkpoint "$OUT" --data "$VALID"
