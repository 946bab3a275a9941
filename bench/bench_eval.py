"""Time of the project's attack suite against torchattacks' standard AutoAttack, same model and
images, measured side by side in one run; prints both robust accuracies and the time ratio.

    python bench/bench_eval.py --n 1000 --mode full                 # a small CNN trained here
    python bench/bench_eval.py --checkpoint runs/byorl --n 200      # a run's encoder + head

Without a checkpoint the model is a small CNN trained for a few hundred steps on CIFAR-10
training images: cheap enough for the full suite on a CPU, robust enough at a small eps that
the later attacks still have points to work on. torchattacks' "standard" AutoAttack runs APGD
and APGD-T with its default 10 steps (the reference implementation uses 100) plus FAB-T and
Square (5000 queries): it is cheaper and weaker than the reference, and far weaker than the
paper's suite. Per-attack seconds are wall time; the ratio is also given in CPU time, which a
busy machine does not distort when the run uses one thread.
"""

import argparse
import time
from pathlib import Path

import torch
import torchattacks
from torch import nn
from torch.nn import functional as F

from byorl.training.attacks import ThreatModel
from byorl.training.data import load_images
from byorl.training.evaluate import evaluate_robustness
from byorl.training.linear_classifier import Classifier, HeadConfig, fit_linear_head, to_float

CIFAR = Path(__file__).resolve().parents[1] / "../shared/data/cifar10-jpeg.tar.gz"


def small_cnn(data: str, steps: int) -> nn.Module:
    train = load_images(data, "train")
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(len(train), (128,))
        loss = F.cross_entropy(net(to_float(train.images[idx])), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def checkpoint_classifier(path: str, data: str | None) -> nn.Module:
    from byorl.training.checkpoint import load_encoder
    from byorl.training.data import label_subset

    encoder, config = load_encoder(path)
    train = load_images(data or config["data"]["source"], "train")
    labeled, val = label_subset(len(train), 500, 0)
    head, _ = fit_linear_head(encoder, train.subset(labeled), train.subset(val), 10, HeadConfig())
    return Classifier(encoder, head).eval()


def autoattack(model, x, y, threat: ThreatModel, batch_size: int) -> float:
    norm = {"linf": "Linf", "l2": "L2"}[threat.norm]
    attack = torchattacks.AutoAttack(model, norm=norm, eps=threat.eps, version="standard",
                                     n_classes=10, seed=0)
    robust = 0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
        with torch.no_grad():
            robust += (model(attack(xb, yb)).argmax(1) == yb).sum().item()
    return robust / len(y)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000, help="test images")
    p.add_argument("--mode", default="full", choices=["quick", "full"])
    p.add_argument("--norm", default="linf")
    p.add_argument("--eps", type=float, default=2 / 255)
    p.add_argument("--data", default=str(CIFAR) if CIFAR.exists() else "cifar10")
    p.add_argument("--checkpoint", default=None, help="a run: its encoder + a 500-label head")
    p.add_argument("--train-steps", type=int, default=400, help="small CNN training steps")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = (checkpoint_classifier(args.checkpoint, args.data) if args.checkpoint
             else small_cnn(args.data, args.train_steps))
    test = load_images(args.data, "test")
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[: args.n]
    x, y = to_float(test.images[idx]), test.labels[idx]
    threat = ThreatModel(args.norm, args.eps)
    print(f"{args.n} test images, {threat.norm} eps {threat.eps:.4g}, {args.threads} thread(s), "
          f"model: {args.checkpoint or f'small CNN ({args.train_steps} steps)'}")

    wall, cpu = time.perf_counter(), time.process_time()
    ours = evaluate_robustness(model, x, y, threat, args.mode, args.batch_size)
    t_ours, c_ours = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    aa_acc = autoattack(model, x, y, threat, args.batch_size)
    t_aa, c_aa = time.perf_counter() - wall, time.process_time() - cpu

    print(f"clean accuracy {ours['clean_accuracy']:.2%}")
    for a in ours["attacks"]:
        print(f"  {a['name']:<14} {a['settings']}  robust {a['robust_accuracy']:.2%}  "
              f"{a['seconds']:.1f} s")
    print(f"project suite ({args.mode}, sanity checks included): robust "
          f"{ours['robust_accuracy']:.2%}, {t_ours:.1f} s wall, {c_ours:.1f} s CPU; checks "
          f"passed: {ours['checks_passed']}")
    print(f"torchattacks AutoAttack (standard): robust {aa_acc:.2%}, {t_aa:.1f} s wall, "
          f"{c_aa:.1f} s CPU")
    print(f"time ratio project / AutoAttack: {t_ours / t_aa:.2f} wall, {c_ours / c_aa:.2f} CPU "
          "(CPU time is the fair one on a shared machine with --threads 1)")


if __name__ == "__main__":
    main()
