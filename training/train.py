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


def train(
    cfg: TrainConfig,
    max_steps: int | None = None,
    time_limit_s: float | None = None,
    progress: bool = True,
) -> Path:
    """Train to the end of the schedule, or stop early (max_steps, time_limit_s) resumably.
    Under torchrun, rank 0's clock decides the stop and every process saves at that step."""
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
    bf16 = uses_bf16(cfg, device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # Data: uint8 images, decoded once (cached), kept whole on the device
    images = load_images(
        cfg.data.source, "train", cfg.data.image_size, cfg.data.root, cfg.data.download
    ).images
    if cfg.data.extra_unlabeled:
        images = torch.cat([images, load_unlabeled(cfg.data.extra_unlabeled, cfg.data.image_size)])
    images = images.to(device)
    n, batch = len(images), cfg.optim.batch_size
    steps_per_epoch = n // batch
    if steps_per_epoch < 1:
        raise ValueError(f"batch size {batch} exceeds the {n} training images")
    total_steps = max(1, round(cfg.optim.epochs * steps_per_epoch))
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)

    # Networks, optimiser, and the state of an interrupted run
    torch.manual_seed(cfg.seed)
    nets = build_networks(cfg, device, distributed)
    online, target, opt = nets.online, nets.target, nets.opt
    start = 0
    if (out / CHECKPOINT).exists():
        ckpt = load_checkpoint(out, map_location=device)
        if not same_training(ckpt["config"], cfg):  # a run directory may move
            raise ValueError(f"{out} holds a run with another config; resume it or use a new --out")
        online.load_state_dict(ckpt["online"])
        target.load_state_dict(ckpt["target"])
        opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["step"]
        torch.set_rng_state(ckpt["rng"][rank % len(ckpt["rng"])])
    else:
        torch.manual_seed(cfg.seed + rank)
    if rank == 0:
        cfg.save(out / "config.json")

    def save(step: int) -> None:
        rngs = [torch.get_rng_state()]
        if distributed:
            rngs = [torch.empty_like(rngs[0]) for _ in range(world)]
            dist.all_gather_object(rngs, torch.get_rng_state())
        if rank == 0:
            save_atomic(
                {
                    "config": cfg.to_dict(),
                    "online": online.state_dict(),
                    "target": target.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step,
                    "rng": rngs,
                },
                out / CHECKPOINT,
            )

    end = total_steps if max_steps is None else min(total_steps, start + max_steps)
    t_start = t_log = time.monotonic()
    bar = tqdm(
        range(start, end),
        initial=start,
        total=total_steps,
        disable=not progress or rank,
        desc="byorl" if nets.attack else "byol",
    )
    with open(out / "metrics.jsonl", "a") if rank == 0 else contextlib.nullcontext() as log:
        for step in bar:
            # 1. two augmented views of this process's share of the global batch
            idx = batch_indices(step, steps_per_epoch, n, batch, cfg.seed)
            idx = idx[rank * batch // world : (rank + 1) * batch // world]
            x = images[idx].float().div_(255).contiguous(memory_format=torch.channels_last)

            # 2-5. each view attacked through the online network and paired with the other
            # view's target projection: the symmetrised BYORL loss; LARS step, scheduled lr;
            # the target network's exponential moving average with the scheduled tau
            lr = get_lr(step, total_steps, warmup_steps, cfg.optim.lr)
            tau = get_tau(step, total_steps, cfg.optim.tau_base)
            step_loss = train_step(nets, x, cfg, lr, tau, bf16)
            loss, p, z = step_loss.loss, step_loss.p, step_loss.z

            # 6. metrics (clean vs attacked similarity, collapse check) and checkpoints; the
            # clean pass runs on every process (cross-replica BatchNorm is a collective)
            done = step + 1
            if done % cfg.log_every == 0 or done == end:
                with (
                    torch.no_grad(),
                    frozen_bn_stats(online),
                    torch.autocast(device.type, torch.bfloat16, enabled=bf16),
                ):
                    views = step_loss.views
                    clean = p.detach() if nets.attack is None else per_view(
                        online, *views.chunk(2), cfg.bn_views == "separate")
                    p_clean = clean.float()
            if rank == 0 and (done % cfg.log_every == 0 or done == end):
                now = time.monotonic()
                steps_here = cfg.log_every if done % cfg.log_every == 0 else done % cfg.log_every
                rec = {
                    "step": done,
                    "epoch": done / steps_per_epoch,
                    "loss": loss.item(),
                    "cos_clean": F.cosine_similarity(p_clean, z, dim=-1).mean().item(),
                    "cos_adv": F.cosine_similarity(p.detach().float(), z, dim=-1).mean().item(),
                    "pred_std": F.normalize(p.detach().float(), dim=1).std(0).mean().item(),
                    "lr": lr,
                    "tau": tau,
                    "images_per_s": steps_here * batch / max(now - t_log, 1e-9),
                }
                t_log = now
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(
                    loss=f"{rec['loss']:.3f}",
                    cos_adv=f"{rec['cos_adv']:.3f}",
                    ips=f"{rec['images_per_s']:.0f}",
                )
            out_of_time = time_limit_s is not None and rank0_decides(
                time.monotonic() - t_start > time_limit_s, device)
            last = done == end or out_of_time
            if done % cfg.checkpoint_every == 0 or last:
                save(done)
            if last:
                break
    if distributed:
        dist.destroy_process_group()
    return out
