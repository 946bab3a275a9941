"""Real training steps on CIFAR-10 images, a SIGKILLed run resumed, a 2-process DDP run."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from byorl.training.byorl import byol_loss
from byorl.training.checkpoint import load_checkpoint, load_encoder
from byorl.training.config import TrainConfig
from byorl.training.train import (
    batch_indices,
    build_networks,
    train,
    uses_bf16,
    uses_compile,
)

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "BYORL_CACHE": str(ROOT / ".cache" / "byorl")}


def tiny_args(images: Path, out: Path, epochs: float = 3) -> list[str]:
    return ["--out", str(out), "--data", str(images), "--arch", "preact_resnet_tiny",
            "--proj-hidden", "32", "--proj-dim", "16", "--batch-size", "32",
            "--epochs", str(epochs),
            "--warmup-epochs", "1", "--attack", "pgd", "--steps", "2", "--device", "cpu",
            "--checkpoint-every", "1", "--log-every", "1", "--seed", "3"]


def run_cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "byorl.cli", "train", *args], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def test_few_byorl_steps_write_a_run(image_folder, tmp_path):
    cfg = TrainConfig()
    cfg.data.source, cfg.out, cfg.device = str(image_folder), str(tmp_path / "run"), "cpu"
    cfg.model.arch, cfg.model.width, cfg.model.proj_hidden, cfg.model.proj_dim = (
        "preact_resnet_tiny", 1, 32, 16)
    cfg.attack.method, cfg.attack.steps = "apgd", 3
    cfg.optim.batch_size, cfg.optim.epochs, cfg.optim.warmup_epochs = 40, 1, 0.5
    cfg.log_every = 1
    run = train(cfg, progress=False)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert set(m) == {"step", "epoch", "loss", "cos_clean", "cos_adv", "pred_std", "lr", "tau",
                          "images_per_s"}
        assert all(torch.isfinite(torch.tensor(float(v))) for v in m.values())
        assert 0 <= m["loss"] <= 8
        assert m["cos_adv"] < m["cos_clean"]  # the attack really lowers the similarity
        assert m["pred_std"] > 0.01  # predictions not collapsed
    assert json.loads((run / "config.json").read_text()) == json.loads(json.dumps(cfg.to_dict()))
    ckpt = load_checkpoint(run)
    assert ckpt["step"] == 3 and ckpt["config"] == cfg.to_dict()
    encoder, config = load_encoder(run)
    assert config["model"]["arch"] == "preact_resnet_tiny"
    assert encoder(torch.rand(2, 3, 32, 32)).shape == (2, encoder.num_features)


def test_a_moved_run_resumes_and_another_config_is_refused(image_folder, tmp_path):
    """Where a run is written is not a training setting: a moved run directory resumes; a
    changed setting does not mix into it."""
    cfg = TrainConfig()
    cfg.data.source, cfg.out, cfg.device = str(image_folder), str(tmp_path / "a"), "cpu"
    cfg.model.arch, cfg.model.proj_hidden, cfg.model.proj_dim = "preact_resnet_tiny", 32, 16
    cfg.attack.method = "none"
    cfg.optim.batch_size, cfg.optim.epochs, cfg.optim.warmup_epochs = 40, 1, 0.5
    train(cfg, max_steps=1, progress=False)
    (tmp_path / "a").rename(tmp_path / "b")
    cfg.out = str(tmp_path / "b")
    train(cfg, max_steps=1, progress=False)
    assert load_checkpoint(tmp_path / "b")["step"] == 2
    cfg.optim.lr = 1.0
    with pytest.raises(ValueError, match="another config"):
        train(cfg, max_steps=1, progress=False)


def test_batches_are_seeded_disjoint_slices_of_one_permutation_per_epoch():
    """Resuming needs no loader state: a step's batch depends only on (step, seed); an epoch's
    batches are disjoint and of full size; the next epoch is shuffled anew."""
    epoch0 = [batch_indices(s, 3, 10, 3, seed=7) for s in range(3)]
    assert all(len(b) == 3 for b in epoch0)
    assert len(set(torch.cat(epoch0).tolist())) == 9
    assert torch.equal(batch_indices(1, 3, 10, 3, seed=7), epoch0[1])
    assert not torch.equal(batch_indices(3, 3, 10, 3, seed=7), epoch0[0])
    assert not torch.equal(batch_indices(0, 3, 10, 3, seed=8), epoch0[0])


def test_killed_run_resumes_to_the_same_state(image_folder, tmp_path):
    straight = run_cli(tiny_args(image_folder, tmp_path / "straight"))
    assert straight.wait(timeout=300) == 0, straight.stdout.read().decode()
    total = load_checkpoint(tmp_path / "straight")["step"]
    assert total == 9

    killed = run_cli(tiny_args(image_folder, tmp_path / "killed"), start_new_session=True)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill as soon as a few steps are saved
        if ckpt.exists() and load_checkpoint(ckpt)["step"] >= 3:
            break
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    interrupted_at = load_checkpoint(ckpt)["step"]
    assert 3 <= interrupted_at < total

    resumed = run_cli(tiny_args(image_folder, tmp_path / "killed"))
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read().decode()
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(ckpt)
    assert b["step"] == total
    for key in ("online", "target"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=0, atol=0, msg=name)


def test_two_process_ddp_run_takes_steps(image_folder, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "byorl.cli", "train", *tiny_args(image_folder, out, epochs=1)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 3 and len(ckpt["rng"]) == 2  # each process's RNG kept for resuming
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # only rank 0 logs
    assert all(torch.isfinite(v).all() for v in ckpt["online"].values())


# Runs `train` under torchrun, each process with a clock of its own: rank r's clock advances
# RATES[r] "seconds" each time the loop reads it, so the two disagree on when a limit is hit.
CLOCKED_TRAIN = """
import itertools, json, os, sys, types
import byorl.training.train
from byorl.training.config import TrainConfig

cfg = TrainConfig.from_dict(json.loads(open(sys.argv[1]).read()))
rates, limit = json.loads(sys.argv[2]), json.loads(sys.argv[3])
ticks = itertools.count(0, rates[int(os.environ["RANK"])])
byorl.training.train.time = types.SimpleNamespace(monotonic=lambda: next(ticks))
byorl.training.train.train(cfg, time_limit_s=limit, progress=False)
"""


def torchrun_clocked(cfg: TrainConfig, tmp_path: Path, rates: list[float], limit) -> None:
    script, config = tmp_path / "clocked_train.py", tmp_path / f"{Path(cfg.out).name}.json"
    script.write_text(CLOCKED_TRAIN)
    config.write_text(json.dumps(cfg.to_dict()))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(config), json.dumps(rates), json.dumps(limit)],
        cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def tiny_config(images: Path, out: Path) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.source, cfg.out, cfg.device, cfg.seed = str(images), str(out), "cpu", 3
    cfg.model.arch, cfg.model.proj_hidden, cfg.model.proj_dim = "preact_resnet_tiny", 32, 16
    cfg.attack.method, cfg.attack.steps = "apgd", 4
    cfg.optim.batch_size, cfg.optim.epochs, cfg.optim.warmup_epochs = 32, 2, 1
    cfg.log_every, cfg.checkpoint_every = 1, 100
    return cfg


def assert_same_networks(a: dict, b: dict) -> None:
    for key in ("online", "target"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=0, atol=0, msg=name)


def test_ddp_stops_on_rank_0s_clock_and_resumes_exactly(image_folder, tmp_path):
    """Rank 1's clock runs 1000x fast (it alone would stop after step 1): rank 0 decides, both
    save at its step and leave together (no hang, no crash), and resuming reaches the state of
    a run never stopped, bit for bit. The default config: SyncBN, per-view BN, AutoPGD (its
    extra passes agreed by all ranks)."""
    straight = tiny_config(image_folder, tmp_path / "straight")
    torchrun_clocked(straight, tmp_path, [1, 1], None)
    total = load_checkpoint(tmp_path / "straight")["step"]
    assert total == 6

    stopped = tiny_config(image_folder, tmp_path / "stopped")
    torchrun_clocked(stopped, tmp_path, [1, 1000], 4.5)
    ckpt = load_checkpoint(tmp_path / "stopped")
    assert 1 < ckpt["step"] < total and len(ckpt["rng"]) == 2
    logged = [json.loads(line)["step"] for line in
              (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, ckpt["step"] + 1))

    torchrun_clocked(stopped, tmp_path, [1, 1], None)
    resumed = load_checkpoint(tmp_path / "stopped")
    assert resumed["step"] == total
    assert_same_networks(load_checkpoint(tmp_path / "straight"), resumed)


def test_a_run_written_before_per_view_bn_resumes_as_it_was_trained(image_folder, tmp_path):
    """A run whose checkpoint and config.json predate bn_views/sync_bn (written here, then the
    fields removed as the old code wrote them) resumes from the command line as the recipe it
    was trained with (concatenated views); today's default (per-view) may not mix into it."""
    old = tiny_config(image_folder, tmp_path / "old")
    old.bn_views, old.sync_bn, old.attack.method = "concat", False, "none"
    train(old, max_steps=1, progress=False)
    ckpt_path = tmp_path / "old" / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path)
    for d in (ckpt["config"], saved := json.loads((tmp_path / "old" / "config.json").read_text())):
        for name in ("bn_views", "sync_bn", "compile"):
            del d[name]
    torch.save(ckpt, ckpt_path)
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))

    resumed = run_cli(["--out", str(tmp_path / "old"), "--max-steps", "1"])
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read().decode()
    again = load_checkpoint(ckpt_path)
    assert again["step"] == 2 and again["config"]["bn_views"] == "concat"
    fresh = tiny_config(image_folder, tmp_path / "old")
    fresh.attack.method = "none"
    with pytest.raises(ValueError, match="another config"):
        train(fresh, max_steps=1, progress=False)


def test_bf16_autocast_steps_on_the_cpu(image_folder, tmp_path):
    cfg = tiny_config(image_folder, tmp_path / "bf16")
    cfg.precision, cfg.attack.method, cfg.attack.steps = "bf16", "pgd", 2
    assert uses_bf16(cfg, torch.device("cpu")) and not uses_bf16(TrainConfig(), torch.device("cpu"))
    train(cfg, max_steps=2, progress=False)
    metrics = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert all(np.isfinite(v) for v in m.values())
        assert 0 < m["loss"] < 8 and m["cos_adv"] < m["cos_clean"]


def test_the_attack_in_bf16_reaches_the_loss_it_reaches_in_fp32():
    """PITFALLS: bf16 changes the gradients the attack follows. The training attack (AutoPGD-10
    through the online network, batch statistics) run under bf16 autocast must raise the fp32
    loss about as far as the fp32 attack does."""
    reached = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(device="cpu", precision=precision)
        cfg.model.arch, cfg.model.proj_hidden, cfg.model.proj_dim = "preact_resnet_tiny", 64, 32
        cfg.attack.steps = 10
        torch.manual_seed(0)
        nets = build_networks(cfg, torch.device("cpu"), distributed=False)
        x = torch.rand(32, 3, 32, 32)
        with torch.no_grad():
            z = nets.target.project(x.flip(-1))
        with torch.no_grad():
            clean = byol_loss(nets.online(x), z).mean().item()
        x_adv = nets.attack.perturb(x, z)
        with torch.no_grad():
            reached[precision] = byol_loss(nets.online(x_adv), z).mean().item()
    assert reached["fp32"] > clean + 0.05  # the attack works
    assert reached["bf16"] > clean + 0.9 * (reached["fp32"] - clean), (clean, reached)


def write_unlabeled_archive(path: Path, count: int) -> None:
    """A .tar.gz of `count` generated 48x48 PNGs in one flat folder (no classes)."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for i in range(count):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, "PNG")
            info = tarfile.TarInfo(f"extra/{i:03d}.png")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)


def test_extra_unlabeled_images_join_the_training_set(image_folder, tmp_path):
    """120 labeled-set images + 8 generated ones (resized to 32x32) = 4 batches of 32 an epoch
    (3 without them); the networks are channels-last."""
    write_unlabeled_archive(tmp_path / "extra.tar.gz", 8)
    cfg = tiny_config(image_folder, tmp_path / "extra")
    cfg.attack.method, cfg.optim.epochs = "none", 1
    cfg.data.extra_unlabeled = [str(tmp_path / "extra.tar.gz")]
    train(cfg, progress=False)
    metrics = [json.loads(line) for line in (tmp_path / "extra" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [(m["step"], m["epoch"]) for m in metrics] == [(1, 0.25), (2, 0.5), (3, 0.75),
                                                          (4, 1.0)]
    online = build_networks(cfg, torch.device("cpu"), distributed=False).online
    convs = [m.weight for m in online.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


def test_compile_is_on_for_cuda_by_default_and_as_asked():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not uses_compile(TrainConfig(), cpu) and uses_compile(TrainConfig(), cuda)
    assert uses_compile(TrainConfig(compile="on"), cpu)
    assert not uses_compile(TrainConfig(compile="off"), cuda)


def test_l2_byorl_steps_through_the_cli_keep_the_attack_in_the_l2_ball(image_folder, tmp_path,
                                                                        monkeypatch):
    """`byorl train --norm l2 --eps 128/255` (the paper's headline threat model), 3 steps: the
    training attack is AutoPGD in l2 at 128/255, every attacked view lies within 128/255 of its
    clean view in l2 norm (per image) and in [0, 1] and uses its budget, the logged loss is
    finite and the attacked similarity below the clean one, and the online weights moved."""
    from typer.testing import CliRunner

    import byorl.training.train as train_module
    from byorl.cli import app
    from byorl.training.attacks import APGD

    torch.set_num_threads(1)  # tiny networks: on the loaded 2-core machine a second thread waits
    eps, build, seen, initial = 128 / 255, train_module.build_networks, [], {}

    def recording(cfg, device, distributed):
        nets = build(cfg, device, distributed)
        initial.update({k: v.clone() for k, v in nets.online.state_dict().items()})
        attack, perturb = nets.attack, nets.attack.perturb
        assert isinstance(attack, APGD) and (attack.norm, attack.eps) == ("l2", eps)

        def perturb_and_record(x, z):
            x_adv = perturb(x, z)
            seen.append(((x_adv - x).flatten(1).norm(dim=1), x_adv.min(), x_adv.max()))
            return x_adv

        attack.perturb = perturb_and_record
        return nets

    monkeypatch.setattr(train_module, "build_networks", recording)
    out = tmp_path / "l2"
    result = CliRunner().invoke(app, ["train", *tiny_args(image_folder, out), "--attack", "apgd",
                                      "--steps", "3", "--norm", "l2", "--eps", "128/255",
                                      "--max-steps", "3"])
    assert result.exit_code == 0, result.output
    assert TrainConfig.from_dict(json.loads((out / "config.json").read_text())).attack.norm == "l2"
    assert len(seen) == 3 * 2  # each step attacks both views, each a batch of its own
    for sizes, low, high in seen:
        assert (sizes <= eps * (1 + 1e-5)).all() and low >= 0 and high <= 1
        assert sizes.median() > eps / 2  # the attack goes out toward the ball's surface
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert all(np.isfinite(v) for v in m.values())
        assert 0 < m["loss"] < 8 and m["cos_adv"] < m["cos_clean"]
    online = load_checkpoint(out)["online"]
    assert any(not torch.equal(online[k], v) for k, v in initial.items() if v.is_floating_point())
