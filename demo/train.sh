#!/usr/bin/env bash
# Reproduce demo/weights from nothing, with the project's own scripts, on a CPU:
#
#     bash demo/train.sh [WORK]        # WORK: scratch folder (default /tmp/demo-run)
#
# Stages (each prints its wall time): the data set, the F8 autoencoder from scratch, its F16 SC-VAE decoder
# (train_vae.py), the tokenizers / frozen text encoders / untrained transformer, the latents (train_wlf.py
# precompute), the transformer with WLF (train_wlf.py train), then the same transformer trained with plain
# velocity MSE for comparison, and the scores of both on the 100 held-out prompts. The shipped weights are the
# WLF model's. Every stage is seeded, except that the BPE trainer of the CLIP tokenizer breaks ties between
# equally frequent merges in no fixed order (its token ids may differ run to run; every word stays one token).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/demo-run}
OUT=demo/weights
PY=${PYTHON:-python}
mkdir -p "$WORK" "$OUT"
stage() { echo "== $1: $(( SECONDS - START )) s" | tee -a "$WORK/times.txt"; START=$SECONDS; }
START=$SECONDS
: > "$WORK/times.txt"

$PY demo/shapes.py make --out "$WORK/data" --count 4000 --heldout "$WORK/heldout" --heldout-count 100 --size 128
stage "data"

$PY demo/train_ae.py --data "$WORK/data" --out "$WORK/ae-f8-800.safetensors" --steps 800
$PY demo/train_ae.py --data "$WORK/data" --out "$WORK/ae-f8.safetensors" --init "$WORK/ae-f8-800.safetensors" \
    --steps 1600 --seed 1 --lr 1e-4  # a warm restart: how the shipped autoencoder was made (800 steps, then 1600 more)
stage "F8 autoencoder (from scratch)"

rm -rf "$WORK/scvae"
$PY train_vae.py --vae "$WORK/ae-f8.safetensors" --data "$WORK/data" --out "$WORK/scvae" --steps 1200 \
    --batch-size 4 --resolution 128 --lr 3e-4 --lambda-lpips 0 --lambda-adv 0 --ema 0.99 --workers 0 \
    --checkpoint-every 0 --log-every 100 --no-progress
cp "$WORK/scvae/vae-f16.safetensors" "$OUT/ae.safetensors"
stage "F16 SC-VAE decoder (train_vae.py: L2 + scale consistency)"

$PY demo/init_weights.py --out "$OUT" --transformer "$WORK/init.safetensors"
$PY train_wlf.py precompute --data "$WORK/data" --out "$WORK/shards" --model flux-schnell --weights "$OUT" \
    --vae "$OUT/ae.safetensors" --t5-tokens 16 --resolution 128 --store-dtype fp32 --dtype fp32 --workers 0 \
    --overwrite --no-progress
stage "tokenizers, text encoders, latents (train_wlf.py precompute)"

train() {  # $1: run name, then the objective's flags
    local name=$1; shift
    rm -rf "$WORK/$name"
    $PY train_wlf.py train --shards "$WORK/shards" --transformer "$WORK/init.safetensors" --out "$WORK/$name" \
        --steps 4000 --batch-size 32 --lr 5e-4 --warmup-steps 100 --weight-decay 0 --precision fp32 \
        --no-activation-checkpointing --checkpoint-every 0 --log-every 100 --no-progress "$@"
    $PY sample.py --model demo --transformer "$WORK/$name/transformer.safetensors" \
        --prompts "$WORK/heldout/metadata.jsonl" --out "$WORK/$name/heldout" --format png
    $PY demo/shapes.py score "$WORK/$name/heldout" --prompts "$WORK/heldout/metadata.jsonl" \
        --json "$WORK/$name/score.json" | tee -a "$WORK/times.txt"
    $PY metrics.py "$WORK/$name/heldout" --json "$WORK/$name/metrics.json" | tail -3 | tee -a "$WORK/times.txt"
}
$PY metrics.py "$WORK/heldout" --json "$WORK/metrics-real.json" | tail -3 | tee -a "$WORK/times.txt"
train wlf --loss wlf --band-weights 1,2,2,2
cp "$WORK/wlf/transformer.safetensors" "$OUT/transformer.safetensors"
stage "transformer, WLF (train_wlf.py train), + sampling and scoring"
train mse --loss mse
stage "transformer, velocity MSE (for comparison), + sampling and scoring"
du -b "$OUT"/*/* "$OUT"/*.safetensors | tee -a "$WORK/times.txt"
# The README's pictures: the shipped model, seed 0.
i=0
for caption in "a large red circle in the center on a blue background" \
               "a small yellow square in the top left on a purple background" \
               "a large white triangle in the bottom right on a green background" \
               "a small orange circle in the top right on a black background"; do
    $PY sample.py "$caption" --out "demo/samples/$i.png"
    i=$((i + 1))
done
