"""BYORL / BYOL training loop: one process, or several under torchrun (DDP, nccl or gloo)."""

import contextlib
import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from byorl.training.augment import augment
from byorl.training.batchnorm import convert_sync_bn, frozen_bn_stats
from byorl.training.byorl import (
    OnlineNetwork,
    StepLoss,
    byol_loss,
    ema_update,
    make_attack,
    make_target,
    per_view,
    symmetric_loss,
)
from byorl.training.checkpoint import CHECKPOINT, load_checkpoint, save_atomic
from byorl.training.config import TrainConfig
from byorl.training.data import load_images, load_unlabeled
from byorl.training.device import pick_device
from byorl.training.optim import LARS, get_lr, get_tau, lars_param_groups


def batch_indices(step: int, steps_per_epoch: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """The global batch of a step: a fresh seeded permutation each epoch, so resuming needs no
    data-loader state."""
    epoch, i = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[i * batch : (i + 1) * batch]


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def uses_compile(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")


def rank0_decides(flag: bool, device: torch.device) -> bool:
    """Rank 0's value of `flag` on every process (a broadcast; the flag itself when alone):
    a decision that changes which collectives run (stop, save) must be one for all, since each
    process's clock is its own."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


def any_rank(flags: torch.Tensor) -> bool:
    """Whether any example of any process has the flag (an all-reduce)."""
    t = flags.any().float().reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class Networks(NamedTuple):
    online: OnlineNetwork  # the parameters (and what the attack runs through)
    model: torch.nn.Module  # the online network as the loss pass calls it (DDP-wrapped or not)
    target: OnlineNetwork
    opt: LARS
    attack: object | None  # an APGD/PGD on the online network, or None (BYOL)


def build_networks(cfg: TrainConfig, device: torch.device, distributed: bool) -> Networks:
    """The online and target networks (cross-replica BatchNorm under DDP when cfg.sync_bn,
    channels-last, compiled when asked), LARS, and the attack on the online network."""
    online = OnlineNetwork(
        cfg.model.arch, cfg.model.width, cfg.model.proj_hidden, cfg.model.proj_dim
    ).to(device, memory_format=torch.channels_last)
    if distributed and cfg.sync_bn:
        online = convert_sync_bn(online, device.type)
    target = make_target(online)
    if uses_compile(cfg, device):  # in place: state_dict keys and DDP's view stay the same
        for net in (online, target):
            for part in (net.encoder, net.projector, net.predictor):
                part.compile()
    opt = LARS(
        lars_param_groups(online, cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        eta=cfg.optim.lars_eta,
    )
    model = DistributedDataParallel(online) if distributed else online
    attack = None
    if cfg.attack.method != "none":
        bf16 = uses_bf16(cfg, device)

        def attack_loss(x_adv, z):
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                return byol_loss(online(x_adv), z)

        attack = make_attack(
            cfg.attack.method,
            attack_loss,
            cfg.attack.norm,
            cfg.attack.eps,
            cfg.attack.steps,
            cfg.attack.step_size,
            any_rank if distributed and cfg.sync_bn else None,
        )
    return Networks(online, model, target, opt, attack)


def train_step(nets: Networks, x: torch.Tensor, cfg: TrainConfig, lr: float, tau: float,
               bf16: bool) -> StepLoss:
    """One BYORL (BYOL) step on a batch of images: two augmented views, each attacked and
    paired with the other's target projection (the symmetrised loss), a LARS step at `lr`,
    the target's EMA at `tau`."""
    for g in nets.opt.param_groups:
        g["lr"] = lr
    out = symmetric_loss(nets.model, nets.target, augment(x, cfg.augment),
                         augment(x, cfg.augment), nets.attack, bf16, cfg.bn_views == "separate")
    nets.opt.zero_grad(set_to_none=True)
    out.loss.backward()
    nets.opt.step()
    ema_update(nets.target, nets.online, tau)
    return out


def same_training(saved: dict, cfg: TrainConfig) -> bool:
    """Whether a checkpoint's config (read as it was trained, see TrainConfig.from_dict) is
    `cfg`'s training: where the run is written and whether it is compiled are not settings."""
    return TrainConfig.from_dict({**saved, "out": cfg.out, "compile": cfg.compile}) == cfg


class Process(NamedTuple):
    """This process under torchrun (rank 0 of 1 when alone) and its device."""

    distributed: bool
    rank: int
    world: int
    device: torch.device


def start_process(cfg: TrainConfig) -> Process:
    """Join the process group when torchrun started several; each process gets its GPU and an
    equal share of the global batch."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world, local_rank = 0, 1, int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device, local_rank)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.optim.batch_size % world:
        raise ValueError(f"batch size {cfg.optim.batch_size} is not divisible by {world} processes")
    return Process(distributed, rank, world, device)


def training_images(cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """uint8 images, decoded once (cached), with the extra unlabeled ones, kept whole on the
    device."""
    images = load_images(
        cfg.data.source, "train", cfg.data.image_size, cfg.data.root, cfg.data.download
    ).images
    if cfg.data.extra_unlabeled:
        images = torch.cat([images, load_unlabeled(cfg.data.extra_unlabeled, cfg.data.image_size)])
    return images.to(device)


class Schedule(NamedTuple):
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def schedule(cfg: TrainConfig, n: int) -> Schedule:
    """The run's length in steps: epochs of `n` images in whole global batches."""
    steps_per_epoch = n // cfg.optim.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch size {cfg.optim.batch_size} exceeds the {n} training images")
    return Schedule(steps_per_epoch, max(1, round(cfg.optim.epochs * steps_per_epoch)),
                    round(cfg.optim.warmup_epochs * steps_per_epoch))


def resume(nets: Networks, cfg: TrainConfig, out: Path, proc: Process) -> int:
    """The step to start from: an interrupted run's, its networks, optimiser and this process's
    random state restored; else 0, with this process's own seed."""
    if not (out / CHECKPOINT).exists():
        torch.manual_seed(cfg.seed + proc.rank)
        return 0
    ckpt = load_checkpoint(out, map_location=proc.device)
    if not same_training(ckpt["config"], cfg):  # a run directory may move
        raise ValueError(f"{out} holds a run with another config; resume it or use a new --out")
    nets.online.load_state_dict(ckpt["online"])
    nets.target.load_state_dict(ckpt["target"])
    nets.opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"][proc.rank % len(ckpt["rng"])])
    return ckpt["step"]


def save_checkpoint(nets: Networks, cfg: TrainConfig, out: Path, step: int,
                    proc: Process) -> None:
    """Rank 0 writes the networks, the optimiser and every process's random state (each
    resumes with its own)."""
    rngs = [torch.get_rng_state()]
    if proc.distributed:
        rngs = [torch.empty_like(rngs[0]) for _ in range(proc.world)]
        dist.all_gather_object(rngs, torch.get_rng_state())
    if proc.rank == 0:
        save_atomic(
            {
                "config": cfg.to_dict(),
                "online": nets.online.state_dict(),
                "target": nets.target.state_dict(),
                "optimizer": nets.opt.state_dict(),
                "step": step,
                "rng": rngs,
            },
            out / CHECKPOINT,
        )


def process_batch(images: torch.Tensor, step: int, sched: Schedule, cfg: TrainConfig,
                  proc: Process) -> torch.Tensor:
    """This process's share of the step's global batch: floats in [0, 1], channels-last."""
    batch = cfg.optim.batch_size
    idx = batch_indices(step, sched.steps_per_epoch, len(images), batch, cfg.seed)
    idx = idx[proc.rank * batch // proc.world : (proc.rank + 1) * batch // proc.world]
    return images[idx].float().div_(255).contiguous(memory_format=torch.channels_last)


def clean_predictions(nets: Networks, step_loss: StepLoss, cfg: TrainConfig,
                      device: torch.device) -> torch.Tensor:
    """The online network's predictions of the step's views unattacked (BYOL's are the step's
    own), BatchNorm statistics untouched; every process runs it (cross-replica BatchNorm is a
    collective)."""
    with (
        torch.no_grad(),
        frozen_bn_stats(nets.online),
        torch.autocast(device.type, torch.bfloat16, enabled=uses_bf16(cfg, device)),
    ):
        views = step_loss.views
        clean = step_loss.p.detach() if nets.attack is None else per_view(
            nets.online, *views.chunk(2), cfg.bn_views == "separate")
        return clean.float()


def log_metrics(log, bar: tqdm, done: int, cfg: TrainConfig, sched: Schedule,
                step_loss: StepLoss, p_clean: torch.Tensor, lr: float, tau: float,
                since: float) -> float:
    """Append the step's record (clean vs attacked similarity, the collapse check) to
    metrics.jsonl and show it on the bar; returns the time the next record's throughput counts
    from."""
    now = time.monotonic()
    steps_here = cfg.log_every if done % cfg.log_every == 0 else done % cfg.log_every
    p, z = step_loss.p.detach().float(), step_loss.z
    rec = {
        "step": done,
        "epoch": done / sched.steps_per_epoch,
        "loss": step_loss.loss.item(),
        "cos_clean": F.cosine_similarity(p_clean, z, dim=-1).mean().item(),
        "cos_adv": F.cosine_similarity(p, z, dim=-1).mean().item(),
        "pred_std": F.normalize(p, dim=1).std(0).mean().item(),
        "lr": lr,
        "tau": tau,
        "images_per_s": steps_here * cfg.optim.batch_size / max(now - since, 1e-9),
    }
    log.write(json.dumps(rec) + "\n")
    log.flush()
    bar.set_postfix(
        loss=f"{rec['loss']:.3f}",
        cos_adv=f"{rec['cos_adv']:.3f}",
        ips=f"{rec['images_per_s']:.0f}",
    )
    return now


def train(
    cfg: TrainConfig,
    max_steps: int | None = None,
    time_limit_s: float | None = None,
    progress: bool = True,
) -> Path:
    """Train to the end of the schedule, or stop early (max_steps, time_limit_s) resumably.
    Under torchrun, rank 0's clock decides the stop and every process saves at that step."""
    # This process, its data and the schedule
    proc = start_process(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    images = training_images(cfg, proc.device)
    sched = schedule(cfg, len(images))

    # Networks, optimiser, and the state of an interrupted run
    torch.manual_seed(cfg.seed)
    nets = build_networks(cfg, proc.device, proc.distributed)
    start = resume(nets, cfg, out, proc)
    if proc.rank == 0:
        cfg.save(out / "config.json")

    end = sched.total_steps if max_steps is None else min(sched.total_steps, start + max_steps)
    t_start = t_log = time.monotonic()
    bar = tqdm(range(start, end), initial=start, total=sched.total_steps,
               disable=not progress or proc.rank, desc="byorl" if nets.attack else "byol")
    with open(out / "metrics.jsonl", "a") if proc.rank == 0 else contextlib.nullcontext() as log:
        for step in bar:
            # 1-5. two augmented views of this process's share of the global batch, each
            # attacked through the online network and paired with the other view's target
            # projection: the symmetrised BYORL loss; LARS step, scheduled lr; the target
            # network's exponential moving average with the scheduled tau
            x = process_batch(images, step, sched, cfg, proc)
            lr = get_lr(step, sched.total_steps, sched.warmup_steps, cfg.optim.lr)
            tau = get_tau(step, sched.total_steps, cfg.optim.tau_base)
            step_loss = train_step(nets, x, cfg, lr, tau, uses_bf16(cfg, proc.device))

            # 6. metrics, rank 0's record of the clean pass every process runs
            done = step + 1
            if done % cfg.log_every == 0 or done == end:
                p_clean = clean_predictions(nets, step_loss, cfg, proc.device)
                if proc.rank == 0:
                    t_log = log_metrics(log, bar, done, cfg, sched, step_loss, p_clean, lr, tau,
                                        t_log)

            # 7. checkpoints, and the stop: rank 0's clock decides it for every process
            out_of_time = time_limit_s is not None and rank0_decides(
                time.monotonic() - t_start > time_limit_s, proc.device)
            last = done == end or out_of_time
            if done % cfg.checkpoint_every == 0 or last:
                save_checkpoint(nets, cfg, out, done, proc)
            if last:
                break
    if proc.distributed:
        dist.destroy_process_group()
    return out
