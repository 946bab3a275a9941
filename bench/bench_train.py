"""BYORL training throughput: the project's step against a plain reference step, side by side.

The reference is what one writes first: torchvision transforms image by image on the CPU, NCHW
tensors, a PGD loop that calls loss.backward() (accumulating parameter gradients it then
throws away) with BatchNorm statistics updated by every attack pass. Same model, batch, K.

    python bench/bench_train.py --arch preact_resnet_small --batch 128 --steps-k 3 --iters 3
"""

import argparse
import time

import torch
from torchvision.transforms import v2

from training.attacks import PGD
from training.augment import AugmentConfig, augment
from training.byorl import OnlineNetwork, byol_loss, ema_update, frozen_bn_stats, make_target
from training.optim import LARS, lars_param_groups


def project_step(online, target, opt, x, k, eps):
    """The step of training/train.py: batched views, input-only gradients in the attack."""
    v = torch.cat([augment(x, AugmentConfig()), augment(x, AugmentConfig())])
    v = v.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        z = target.project(v)
    z = torch.cat([z[len(x):], z[: len(x)]])
    with frozen_bn_stats(online):
        v = PGD(lambda xa, t: byol_loss(online(xa), t), "linf", eps, k).perturb(v, z)
    loss = 2 * byol_loss(online(v), z).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    ema_update(target, online, 0.99)


REFERENCE_AUG = v2.Compose([
    v2.RandomResizedCrop(32, antialias=True), v2.RandomHorizontalFlip(),
    v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(0.2)])


def reference_step(online, target, opt, x, k, eps):
    """A straightforward version: per-image transforms, full backward in every attack step."""
    v1 = torch.stack([REFERENCE_AUG(im) for im in x])
    v2_ = torch.stack([REFERENCE_AUG(im) for im in x])
    loss = 0
    for a, b in ((v1, v2_), (v2_, v1)):
        with torch.no_grad():
            z = target.project(b)
        delta = torch.empty_like(a).uniform_(-eps, eps)
        for _ in range(k):
            delta.requires_grad_(True)
            byol_loss(online((a + delta).clamp(0, 1)), z).sum().backward()
            delta = (delta + 2.5 * eps / k * delta.grad.sign()).clamp(-eps, eps).detach()
        opt.zero_grad()
        loss = loss + byol_loss(online((a + delta).clamp(0, 1)), z).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    ema_update(target, online, 0.99)


def images_per_s(step, channels_last, args) -> float:
    torch.manual_seed(0)
    online = OnlineNetwork(args.arch, 1, args.proj_hidden, 128)
    if channels_last:
        online = online.to(memory_format=torch.channels_last)
    target = make_target(online)
    opt = LARS(lars_param_groups(online, 5e-4), lr=1.0)
    x = torch.rand(args.batch, 3, 32, 32)
    step(online, target, opt, x, args.steps_k, 8 / 255)  # warm-up
    t = time.perf_counter()
    for _ in range(args.iters):
        step(online, target, opt, x, args.steps_k, 8 / 255)
    return args.iters * args.batch / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="preact_resnet_small")
    p.add_argument("--proj-hidden", type=int, default=1024)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps-k", type=int, default=3)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args}")
    ours = images_per_s(project_step, True, args)
    ref = images_per_s(reference_step, False, args)
    print(f"project step:   {ours:8.1f} images/s")
    print(f"reference step: {ref:8.1f} images/s")
    print(f"ratio (project / reference): {ours / ref:.2f}x")


if __name__ == "__main__":
    main()
