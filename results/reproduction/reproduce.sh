#!/usr/bin/env bash
# The reproduction study (issue 10): the paper's four claims at CPU scale on CIFAR-10 (the shared
# JPEG archive), linf 8/255, every cell evaluated with the paper's full attack suite on 500 random
# test images (seed 0). Every step resumes: training from its checkpoint, exports are skipped once
# their card exists, finished cells (results/reproduction/cells/*.json) are never recomputed.
#
# Budget: the same number of images seen by every method, 1365 optimiser steps of 128 images
# (3.5 epochs of the 50,000 training images): the recipe of the shipped encoder
# (results/cpu-default/train-byorl-linf/config.json), only the inner attack changing.
# byorl-pgd3 and byol are the shipped models/default and models/byol-reference (same recipe, same
# budget), copied here so that re-shipping models/ never changes the study's encoders.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/reproduction}  # training checkpoints (not committed)
STUDY=results/reproduction
BASE=results/cpu-default/train-byorl-linf/config.json

train_export() {  # NAME TRAIN-OPTIONS...: train a BYORL encoder, export it into the study
  local name=$1
  shift
  if [ ! -f "$STUDY/encoders/$name/card.json" ]; then
    byorl train --config "$BASE" --out "$RUNS/$name" "$@"
    byorl export "$RUNS/$name" --out "$STUDY/encoders/$name"
  fi
}
experiment() {  # METHODS: the study's cells of these methods (heads: nonrobust, l2, robust)
  byorl experiment --config "$STUDY/study.json" --out "$STUDY" --methods "$1"
}

experiment byorl-pgd3,byol
train_export byorl-pgd1 --attack pgd --steps 1
experiment byorl-pgd3,byol,byorl-pgd1
experiment byorl-pgd3,byol,byorl-pgd1,at,uat_ft
train_export byorl-apgd5 --attack apgd --steps 5
experiment byorl-pgd3,byol,byorl-pgd1,at,uat_ft,byorl-apgd5
python "$STUDY/claims.py" "$STUDY"
# The paper's headline threat model (issue 33): the same recipe with the inner attack in l2
# 128/255 (PGD-3). Its cells (and the linf encoder under l2, this one under linf) follow once
# study.json lists the l2 threat.
train_export byorl-l2 --norm l2 --eps 128/255
# Its cells, the shipping decision's two first (the l2 and the linf encoder under l2, L2-chosen
# head, all labels), then BYOL and both encoders with every head and label amount under l2, and
# the l2 encoder under linf (does robustness carry across threat models?).
l2_experiment() {  # METHODS THREAT [more options]
  byorl experiment --config "$STUDY/study.json" --out "$STUDY" --methods "$1" --threat "$2" "${@:3}"
}
l2_experiment byorl-l2,byorl-pgd3 l2:128/255 --heads l2 --labels 1
l2_experiment byorl-l2,byorl-pgd3,byol l2:128/255
l2_experiment byorl-l2 linf:8/255
python "$STUDY/claims.py" "$STUDY"
