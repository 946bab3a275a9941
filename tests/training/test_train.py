"""Real training steps on CIFAR-10 images, a SIGKILLed run resumed, a 2-process DDP run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training.checkpoint import load_checkpoint, load_encoder
from training.config import TrainConfig
from training.train import batch_indices, pick_device, train

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "BYORL_CACHE": str(ROOT / ".cache" / "byorl")}


def tiny_args(images: Path, out: Path, epochs: float = 3) -> list[str]:
    return ["--out", str(out), "--data", str(images), "--arch", "preact_resnet_tiny",
            "--proj-hidden", "32", "--proj-dim", "16", "--batch-size", "32",
            "--epochs", str(epochs),
            "--warmup-epochs", "1", "--attack", "pgd", "--steps", "2", "--device", "cpu",
            "--checkpoint-every", "1", "--log-every", "1", "--seed", "3"]


def run_cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "training.cli", "train", *args], cwd=ROOT,
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


def test_pick_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == pick_device("auto").type == expected
    assert pick_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert pick_device("auto", local_rank=1) == torch.device("cuda:1")


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
         "-m", "training.cli", "train", *tiny_args(image_folder, out, epochs=1)],
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
import training.train
from training.config import TrainConfig

cfg = TrainConfig.from_dict(json.loads(open(sys.argv[1]).read()))
rates, limit = json.loads(sys.argv[2]), json.loads(sys.argv[3])
ticks = itertools.count(0, rates[int(os.environ["RANK"])])
training.train.time = types.SimpleNamespace(monotonic=lambda: next(ticks))
training.train.train(cfg, time_limit_s=limit, progress=False)
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
