#!/usr/bin/env bash
# Recipe for the shipped models: alibi-small and sinusoidal-small, trained identically on the
# books corpus (../shared/data/books) at a training length of 256 tokens; only --position and the
# token-embedding scale differ. alibi-small was trained before `train --embed-scale` existed, with
# embeddings x 1 (--embed-scale 1 reproduces it); sinusoidal-small takes train's default, the paper's
# x sqrt(d) (issue 22: with x 1 its unit-amplitude position vectors drown the N(0, 0.02) token
# embeddings). tools/fair_baselines.py run --retrain-shipped retrains sinusoidal-small the same way
# on the device, from the config its trainer_state.json records.
# Usage: tools/train_shipped.sh CORPUS_DIR OUT_DIR [extra train options]
set -euo pipefail
corpus=${1:?corpus folder}; out=${2:?output folder}; shift 2
common=(--corpus "$corpus" --train-len 256 --layers 4 --heads 8 --d-model 256 --d-ff 768 --vocab-size 4096
        --batch-size 64 --steps 4000 --lr 1e-3 --warmup 200 --eval-every 500 --save-every 1000 --seed 0
        --save-dtype bfloat16 --no-optimizer "$@")
python3 -m alibi_export train --position alibi --embed-scale 1 -o "$out/alibi-small" "${common[@]}"
python3 -m alibi_export train --position sinusoidal -o "$out/sinusoidal-small" \
    --tokenizer "$out/alibi-small/tokenizer.json" "${common[@]}"
