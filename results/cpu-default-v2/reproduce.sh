#!/usr/bin/env bash
# The candidate re-ship of models/default and models/byol-reference (issue 10 part 3): the
# shipped recipe (results/cpu-default/, PreAct ResNet small, PGD-3, batch 128, LARS 0.5) trained
# for 17 epochs instead of 3.5 (6630 steps, ~5 h of one core of this 2-core machine per encoder
# with an attack), its BYOL reference with the same budget, and every number of their cards from
# the paper's full attack suite on 1000 random test images (heads: the paper's non-robust one,
# the L2-chosen one, an adversarially trained one; 500 and all labels). Every step resumes:
# training from its checkpoint (runs/), the evaluation per attack (results/cpu-default-v2/partial/).
set -euo pipefail
cd "$(dirname "$0")/../.."
V2=results/cpu-default-v2
# Cells attack exported encoders: Square then queries ONNX Runtime (faster), and the study's
# encoders stay here whatever models/ later holds.
encoder() {  # encoder NAME RUN: export the run once
  [ -f $V2/encoders/$1/card.json ] || byorl export $2 --out $V2/encoders/$1
}
byorl train --config $V2/train-byorl-linf/config.json --out runs/default-e17
encoder byorl runs/default-e17
# BYORL's cells first: they decide issue 10's targets and hold most of the suite's time.
byorl experiment --config $V2/experiment.json --out $V2 --methods byorl
byorl train --config $V2/train-byol/config.json --out runs/default-e17-byol
encoder byol runs/default-e17-byol
byorl experiment --config $V2/experiment.json --out $V2
python results/collect_metrics.py $V2 $V2/metrics.json
byorl export runs/default-e17 --out models/default --metrics $V2/metrics.json
byorl export runs/default-e17-byol --out models/byol-reference --metrics $V2/metrics.json
