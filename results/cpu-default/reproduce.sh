#!/usr/bin/env bash
# Reproduces the 3.5-epoch encoders bundled until session 15 (superseded by the 17-epoch ones of
# results/cpu-default-v2/, which models/ now holds) and results/cpu-default/metrics.json (quick
# suite) on a 2-core CPU: ~65 + ~25 min of training, ~1 h of evaluation. Their train configs are
# the reproduction study's base (results/reproduction/). Exports go to runs/, not models/.
# Every `byorl train` resumes from its checkpoint when rerun.
set -euo pipefail
COMMON="--data ../shared/data/cifar10-jpeg.tar.gz --arch preact_resnet_small --width 1
  --proj-hidden 1024 --proj-dim 128 --batch-size 128 --lr 0.5 --tau-base 0.99 --min-crop 0.2
  --color-strength 0.3 --device cpu --checkpoint-every 20 --log-every 10 --epochs 3.5
  --warmup-epochs 0.15 --time-limit-min 85"
byorl train --out runs/cpu-byorl-linf $COMMON --attack pgd --norm linf --eps 8/255 --steps 3
byorl train --out runs/cpu-byol $COMMON --attack none

# Linear heads on 500 (1 %) and all labels, attacked on 1000 random test images (quick suite).
# Robust heads: PGD-3 adversarial training, 5 epochs x 40 batches of 128 (a CPU budget).
EVAL="--mode quick --n-test 1000 --device cpu"
ROBUST="--head robust --head-attack-steps 3 --head-epochs 5 --head-steps-per-epoch 40"
for run in byorl-linf byol; do
  for labels in 500 1.0; do
    byorl evaluate runs/cpu-$run --labels $labels --head nonrobust $EVAL \
      --out runs/final/$run-$labels-nonrobust
    byorl evaluate runs/cpu-$run --labels $labels $ROBUST $EVAL --out runs/final/$run-$labels-robust
  done
done
python results/collect_metrics.py runs/final results/cpu-default/metrics.json
M=results/cpu-default/metrics.json
byorl export runs/cpu-byorl-linf --out runs/cpu-default-models/default --metrics $M
byorl export runs/cpu-byol --out runs/cpu-default-models/byol-reference --metrics $M
