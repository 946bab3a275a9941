"""frozen_bn_stats, and cross-replica BatchNorm on the CPU: two gloo processes, each with half
of a batch, get the statistics, outputs and gradients of one process holding the whole batch."""

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from byorl.training.batchnorm import CpuSyncBatchNorm, convert_sync_bn, frozen_bn_stats

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def whole_batch(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """A batch, the weights of a loss sum(out * w) on it, and a BatchNorm with non-trivial
    affine parameters and running statistics: the same in every process (seeded)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + 1
    w = torch.randn(shape, generator=g)
    bn = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1], momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2, generator=g)
        bn.bias.uniform_(-1, 1, generator=g)
        bn.running_mean.uniform_(-1, 1, generator=g)
    return x, w, bn


def reference(shape):
    """One process, the whole batch: output, running stats, and the gradients of the loss."""
    x, w, bn = whole_batch(shape)
    x.requires_grad_(True)
    out = bn(x)
    (out * w).sum().backward()
    return out.detach(), bn.running_mean, bn.running_var, x.grad, bn.weight.grad, bn.bias.grad


SHAPES = ((8, 3, 4, 4), (10, 5))


def worker(rank: int, port: int, out_dir: str) -> None:
    """One process with its share of each batch: what its synced BatchNorm computed, saved for
    the test to compare with the whole-batch reference."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        results = []
        for shape in SHAPES:
            x, w, bn = whole_batch(shape)
            net = convert_sync_bn(nn.Sequential(bn), "cpu")
            share = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
            xs = x[share].clone().requires_grad_(True)
            out = net(xs)
            (out * w[share]).sum().backward()
            for p in (net[0].weight, net[0].bias):
                dist.all_reduce(p.grad)  # what DDP does with parameter gradients
            r = {"type": type(net[0]), "out": out.detach(), "mean": net[0].running_mean.clone(),
                 "var": net[0].running_var.clone(), "dx": xs.grad, "dw": net[0].weight.grad,
                 "db": net[0].bias.grad}
            # the attack's passes: batch statistics, running averages left alone
            with torch.no_grad(), frozen_bn_stats(net):
                r["frozen_out"] = net(x[share])
            r["frozen_mean"], r["frozen_var"] = net[0].running_mean, net[0].running_var
            r["momentum"] = net[0].momentum
            net.eval()  # inference: the running statistics, no collective
            with torch.no_grad():
                r["eval_out"] = net(x[share])
            r["weight"], r["bias"] = net[0].weight.detach(), net[0].bias.detach()
            results.append(r)
        torch.save(results, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_normalise_with_the_statistics_of_the_whole_batch(tmp_path):
    torch.multiprocessing.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD,
                                join=True)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"{rank}.pt", weights_only=False)
        assert len(results) == len(SHAPES)
        for shape, r in zip(SHAPES, results, strict=True):
            out_ref, mean_ref, var_ref, dx_ref, dw_ref, db_ref = reference(shape)
            share = slice(rank * shape[0] // WORLD, (rank + 1) * shape[0] // WORLD)
            assert r["type"] is CpuSyncBatchNorm
            torch.testing.assert_close(r["out"], out_ref[share])
            torch.testing.assert_close(r["mean"], mean_ref)
            torch.testing.assert_close(r["var"], var_ref)
            torch.testing.assert_close(r["dx"], dx_ref[share])
            torch.testing.assert_close(r["dw"], dw_ref)
            torch.testing.assert_close(r["db"], db_ref)
            torch.testing.assert_close(r["frozen_out"], out_ref[share])
            assert torch.equal(r["frozen_mean"], r["mean"])
            assert torch.equal(r["frozen_var"], r["var"])
            assert r["momentum"] == 0.3
            x = whole_batch(shape)[0][share]
            torch.testing.assert_close(r["eval_out"], F.batch_norm(
                x, mean_ref, var_ref, r["weight"], r["bias"], False, 0, 1e-5))


def test_alone_it_is_plain_batch_norm():
    """No process group: the converted layer is the BatchNorm it was (same output, same
    running statistics), and its state_dict keys are the same (checkpoints load either way)."""
    x, _, plain = whole_batch((6, 3, 2, 2))
    net = convert_sync_bn(nn.Sequential(whole_batch((6, 3, 2, 2))[2]), "cpu")
    assert set(net[0].state_dict()) == set(plain.state_dict())
    torch.testing.assert_close(net(x), plain(x))
    torch.testing.assert_close(net[0].running_var, plain.running_var)
    with pytest.raises(ValueError, match="2D"):
        net(torch.ones(3))


def test_frozen_bn_stats_restores_momentum_when_the_attack_fails():
    net = nn.Sequential(nn.BatchNorm1d(3, momentum=0.3), nn.BatchNorm1d(3, momentum=None))
    with pytest.raises(RuntimeError), frozen_bn_stats(net):
        assert [m.momentum for m in net] == [0.0, 0.0]
        raise RuntimeError("attack failed")
    assert [m.momentum for m in net] == [0.3, None]
