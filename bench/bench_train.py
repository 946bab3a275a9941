"""BYORL training throughput: the training step of training/train.py, eager and compiled, and a
plain reference step, measured side by side in one run; FLOP utilisation; the paper's 1000
epochs projected on this device.

The reference is what one writes first: torchvision transforms image by image on the CPU, NCHW
tensors, a PGD loop that calls loss.backward() (accumulating parameter gradients it then
throws away) with BatchNorm statistics updated by every attack pass. Same model, batch, K.

    python bench/bench_train.py --arch preact_resnet_small --batch 128 --attack pgd --steps 3
    python bench/bench_train.py --device cuda --arch preact_resnet34 --width 2 --batch 512 \\
        --attack apgd --steps 40

Model FLOPs are counted with torch.utils.flop_counter over one eager step (every matmul and
convolution of the forward passes, the attack's input gradients and the weight gradients) and
divided by the device's peak for the step's precision: --peak-tflops, or the card's dense bf16
peak from KNOWN_PEAKS, or on the CPU a GEMM measured in this run.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import v2

from byorl.training.byorl import OnlineNetwork, byol_loss, ema_update, make_target
from byorl.training.config import TrainConfig
from byorl.training.optim import LARS, lars_param_groups
from byorl.training.train import build_networks, train_step, uses_bf16

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; matched in order.
KNOWN_PEAKS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
               ("L40S", 362.0), ("L4", 121.0)]
PAPER_EPOCHS, PAPER_IMAGES = 1000, 50_000


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


def bench_config(args, compiled: bool) -> TrainConfig:
    cfg = TrainConfig(device=args.device, precision=args.precision,
                      compile="on" if compiled else "off", bn_views=args.bn_views)
    cfg.model.arch, cfg.model.width = args.arch, args.width
    cfg.model.proj_hidden, cfg.model.proj_dim = args.proj_hidden, args.proj_dim
    cfg.attack.method, cfg.attack.steps = args.attack, args.steps
    cfg.optim.batch_size = args.batch
    return cfg


def project_runner(args, device: torch.device, compiled: bool):
    """One training step of train.py (its networks, attack and step function) per call."""
    cfg = bench_config(args, compiled)
    torch.manual_seed(0)
    nets = build_networks(cfg, device, distributed=False)
    bf16 = uses_bf16(cfg, device)
    x = torch.rand(args.batch, 3, 32, 32, device=device).contiguous(
        memory_format=torch.channels_last)
    return lambda: train_step(nets, x, cfg, 0.1, 0.99, bf16)


def reference_runner(args):
    torch.manual_seed(0)
    online = OnlineNetwork(args.arch, args.width, args.proj_hidden, args.proj_dim)
    target = make_target(online)
    opt = LARS(lars_param_groups(online, 5e-4), lr=1.0)
    x = torch.rand(args.batch, 3, 32, 32)
    return lambda: reference_step(online, target, opt, x, args.steps, 8 / 255)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _GlobalOnly:
    """FlopCounterMode's per-module tracker fails inside autograd.grad (the attack's input
    gradients; torch 2.14): count the whole step under "Global" only."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def step_flops(run) -> int:
    """Model FLOPs of one step (matmuls and convolutions, forward and backward)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        run()
    return counter.get_total_flops()


def gemm_tflops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """The best of `reps` n x n x n matrix products: this device's attainable GEMM rate."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device,
                                                                      dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def peak_tflops(args, device: torch.device, bf16: bool) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in KNOWN_PEAKS:
            if key in name and bf16:
                return peak, f"{name} dense bf16 data sheet"
        return None, f"{name}: no known peak for this precision (pass --peak-tflops)"
    dtype = torch.bfloat16 if bf16 else torch.float32
    return gemm_tflops(device, dtype), f"best GEMM 2048^3 {dtype} of this run's rounds"


def time_side_by_side(runners: dict, device: torch.device, warmup: int, rounds: int,
                      between=lambda: None) -> dict:
    """Seconds per step of each runner: warm-up calls (compilation happens there, timed apart),
    then `rounds` rounds of one timed call each, in turn, so that a background load weighs on
    all alike; the median per runner. `between()` runs after each round."""
    warm, times = {}, {name: [] for name in runners}
    for name, run in runners.items():
        sync(device)
        t = time.perf_counter()
        for _ in range(warmup):
            run()
        sync(device)
        warm[name] = time.perf_counter() - t
    for _ in range(rounds):
        for name, run in runners.items():
            sync(device)
            t = time.perf_counter()
            run()
            sync(device)
            times[name].append(time.perf_counter() - t)
        between()
    return {name: {"s_per_step": statistics.median(ts), "warmup_s": warm[name],
                   "all_s": ts} for name, ts in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--arch", default="preact_resnet_small")
    p.add_argument("--width", type=int, default=1)
    p.add_argument("--proj-hidden", type=int, default=1024)
    p.add_argument("--proj-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--attack", default="pgd", help="pgd (the reference's attack) or apgd")
    p.add_argument("--steps", type=int, default=3, help="attack steps K")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA), fp32, bf16")
    p.add_argument("--bn-views", default="separate", help="separate (the paper's) or concat")
    p.add_argument("--variants", default="eager,compiled,reference",
                   help="comma-separated: eager, compiled, reference (CPU, --attack pgd only)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but PyTorch sees no GPU")
    variants = args.variants.split(",")
    if "reference" in variants and (device.type != "cpu" or args.attack != "pgd"):
        variants.remove("reference")  # its per-image CPU transforms and PGD: same K only
    bf16 = uses_bf16(bench_config(args, False), device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {card}, {torch.get_num_threads()} threads, "
          f"{'bf16' if bf16 else 'fp32'}, {vars(args)}", flush=True)

    make = {"eager": lambda: project_runner(args, device, False),
            "compiled": lambda: project_runner(args, device, True),
            "reference": lambda: reference_runner(args)}
    runners = {name: make[name]() for name in variants}
    flops = step_flops(project_runner(args, device, False))
    peaks = []  # on the CPU, the GEMM peak is measured in every round too: the best counts

    def measure_peak():
        peaks.append(peak_tflops(args, device, bf16))

    measure_peak()
    results = time_side_by_side(runners, device, args.warmup, args.rounds,
                                measure_peak if device.type == "cpu" else lambda: None)
    peak, peak_source = max(peaks, key=lambda p: p[0] or 0)
    steps_1000 = PAPER_EPOCHS * (PAPER_IMAGES // args.batch)
    print(f"model FLOPs per step: {flops / 1e12:.3f} TFLOP; peak {peak and f'{peak:.2f}'} "
          f"TFLOP/s ({peak_source})")
    for name, r in results.items():
        r["images_per_s"] = args.batch / r["s_per_step"]
        r["tflops"] = flops / r["s_per_step"] / 1e12
        r["mfu"] = r["tflops"] / peak if peak else None
        r["days_1000_epochs"] = steps_1000 * r["s_per_step"] / 86400
        mfu = f"{100 * r['mfu']:5.1f} %" if r["mfu"] is not None else "n/a"
        print(f"{name:>9}: {r['images_per_s']:9.1f} img/s  {r['s_per_step']:8.3f} s/step  "
              f"warm-up {r['warmup_s']:7.1f} s  {r['tflops']:7.3f} TFLOP/s  MFU {mfu}  "
              f"1000 epochs x 50k: {r['days_1000_epochs']:8.2f} days")
    if "reference" in results:
        print(f"ratio eager / reference: "
              f"{results['eager']['images_per_s'] / results['reference']['images_per_s']:.2f}x")
    if "compiled" in results and "eager" in results:
        print(f"ratio compiled / eager: "
              f"{results['compiled']['images_per_s'] / results['eager']['images_per_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "device": card, "bf16": bf16, "flops_per_step": flops,
                                         "peak_tflops": peak, "peak_source": peak_source,
                                         "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
