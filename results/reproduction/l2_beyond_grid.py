"""The L2 strength of a non-robust head beyond the study's grid, chosen by the study's rule
(clean + PGD-10 accuracy on the 1024 held-out images, never the test set).

    python results/reproduction/l2_beyond_grid.py \
        results/reproduction/encoders/byorl-pgd3 500 0.3,1,3,10

Arguments: an encoder (run, checkpoint or model directory), the label amount, the comma list of
strengths. Prints the chosen strength and the held-out accuracies of each, as JSON.
"""

import json
import sys

import torch

from byorl.training.checkpoint import load_encoder
from byorl.training.data import label_subset, load_images
from byorl.training.linear_classifier import HeadConfig, select_l2_head

DATA = "../shared/data/cifar10-jpeg.tar.gz"  # the study's (results/reproduction/study.json)


def main(encoder_path: str, amount: float, grid: tuple[float, ...]) -> None:
    torch.set_num_threads(1)
    encoder, _ = load_encoder(encoder_path)
    train = load_images(DATA, "train", 32)
    labeled, held_out = label_subset(len(train), amount, 0, 1024)  # the study's seed and size
    _, history = select_l2_head(encoder, train.subset(labeled), train.subset(held_out), 10,
                                HeadConfig(), grid=grid)
    print(json.dumps({"chosen": history["l2"], "grid": history["l2_grid"]}))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), tuple(float(g) for g in sys.argv[3].split(",")))
