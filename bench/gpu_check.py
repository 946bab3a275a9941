"""Every GPU path of the project in one call: the steps `bench/gpu_check.sh` runs, each a
subprocess under its own time limit inside one overall budget, their outputs parsed into one
Markdown table (printed, and written to results/gpu/gpu_check-<card>-<date>.md).

Needs a CUDA GPU and the `gpu` extra (`pip install -e '.[gpu,train,service]'`); run it through
`bash bench/gpu_check.sh`. A step that fails, times out or prints what it should not becomes a
FAIL row with the reason; the others still run. What needs no GPU (arguments, running a step
under a time limit, parsing outputs, the table) is tested on the CPU in
tests/bench/test_gpu_check.py. The probes (`ort`, `faiss`, `ddp`, `serve` subcommands) are
what the steps run on the GPU.
"""

import argparse
import base64
import datetime
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
SAMPLE = ROOT / "tests" / "data" / "cifar10-test-sample.npz"
BUDGET_S = 440  # all steps together: under 8 minutes with the start and the table
MIN_STEP_S = 5  # a step left less than this is not started
ORT_TOLERANCE = 1e-2  # max |cuda - cpu| / max |cpu|: TF32 convolutions differ by ~1e-3
FAISS_SAME_TOPK = 0.999  # fraction of queries whose top-k ids must agree (near-ties may swap)
MOVED = 1e-3  # a logged value "moves" when first and last differ by more than this


class CheckFailed(Exception):
    """A step ran but its output shows the path is broken (the message says how)."""


@dataclass(frozen=True)
class Row:
    step: str
    passed: bool
    detail: str
    seconds: float


@dataclass(frozen=True)
class Step:
    """A command under a time limit; `parse(stdout)` turns its output into the row's detail
    (raising CheckFailed, or anything else, when the output shows a failure)."""

    name: str
    argv: list[str]
    limit_s: float
    parse: Callable[[str], str]


def last_lines(text: str, n: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[-n:]) or "no output"


def run_step(step: Step, deadline: float, env: dict[str, str] | None = None) -> Row:
    """Run one step, never raising: its time limit is cut to what is left before `deadline`
    (time.monotonic()); the whole process group is killed on timeout (torchrun's workers,
    the probe's uvicorn)."""
    limit = min(step.limit_s, deadline - time.monotonic())
    if limit < MIN_STEP_S:
        return Row(step.name, False, "skipped: the time budget is spent", 0.0)
    start = time.monotonic()
    proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return Row(step.name, False, f"timed out after {limit:.0f} s: {last_lines(err or out)}",
                   time.monotonic() - start)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        return Row(step.name, False, f"exit {proc.returncode}: {last_lines(err or out)}", seconds)
    try:
        return Row(step.name, True, step.parse(out), seconds)
    except Exception as e:  # a parse error is a FAIL row like any other
        return Row(step.name, False, f"{type(e).__name__}: {e}", seconds)


def run_steps(steps: list[Step], budget_s: float, env: dict[str, str] | None = None,
              report: Callable[[Row], None] = lambda row: None) -> list[Row]:
    """All steps in order within `budget_s` seconds, each reported as it ends."""
    deadline = time.monotonic() + budget_s
    rows = []
    for step in steps:
        rows.append(run_step(step, deadline, env))
        report(rows[-1])
    return rows


def render_table(rows: list[Row], title: str) -> str:
    """The Markdown report: one row per step, PASS/FAIL, seconds, detail (pipes escaped)."""
    lines = [f"# {title}", "", "| step | result | seconds | detail |", "|---|---|---|---|"]
    for r in rows:
        detail = r.detail.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.step} | {'PASS' if r.passed else 'FAIL'} | {r.seconds:.1f} | "
                     f"{detail} |")
    passed = sum(r.passed for r in rows)
    lines += ["", f"{passed} of {len(rows)} steps passed."]
    return "\n".join(lines) + "\n"


def report_path(out_dir: Path, card: str, day: datetime.date) -> Path:
    """results/gpu/gpu_check-<card>-<date>.md, the card's name made a file name."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-") or "unknown-card"
    return out_dir / f"gpu_check-{slug}-{day.isoformat()}.md"


# -- parsing each step's output ---------------------------------------------------------------


def json_line(out: str) -> dict:
    """The last line of `out` that is a JSON object (what each probe prints last)."""
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise CheckFailed(f"no JSON line in the output: {last_lines(out)}")


def parse_ort(out: str) -> str:
    r = json_line(out)
    if r["provider"] != "CUDAExecutionProvider":
        raise CheckFailed(f"the CUDA session runs on {r['provider']}")
    rel = r["max_abs_diff"] / r["max_abs"]
    detail = (f"max abs diff {r['max_abs_diff']:.2e} ({rel:.1e} of max |cpu|); cuda "
              f"{r['cuda_images_per_s']:.0f} img/s, cpu {r['cpu_images_per_s']:.0f} img/s "
              f"({r['cuda_images_per_s'] / r['cpu_images_per_s']:.1f}x), batch {r['batch']}")
    if not rel <= ORT_TOLERANCE:
        raise CheckFailed(f"outputs differ: {detail}")
    return detail


def parse_faiss(out: str) -> str:
    r = json_line(out)
    detail = (f"same top-{r['k']} ids for {r['same_topk']:.2%} of {r['queries']} queries over "
              f"{r['n']} x {r['dim']}; gpu {r['gpu_ms_per_query']:.4f} ms/query, cpu "
              f"{r['cpu_ms_per_query']:.4f} ({r['cpu_ms_per_query'] / r['gpu_ms_per_query']:.1f}x)")
    if not r["same_topk"] >= FAISS_SAME_TOPK:
        raise CheckFailed(f"top-k differ: {detail}")
    return detail


def parse_bench_train(path: Path) -> str:
    """bench_train.py's --json: per variant img/s, MFU and the 1000-epoch projection."""
    r = json.loads(path.read_text())
    parts = []
    for name, v in r["results"].items():
        mfu = f"MFU {v['mfu']:.1%}" if v["mfu"] is not None else "MFU n/a"
        parts.append(f"{name} {v['images_per_s']:.0f} img/s, {mfu}, warm-up {v['warmup_s']:.0f} s,"
                     f" 1000 epochs {24 * v['days_1000_epochs']:.1f} h")
    res = r["results"]
    if "eager" in res and "compiled" in res:
        ratio = res["compiled"]["images_per_s"] / res["eager"]["images_per_s"]
        parts.append(f"compiled/eager {ratio:.2f}x")
    return (f"{r['flops_per_step'] / 1e12:.1f} TFLOP/step, peak {r['peak_tflops']} TFLOP/s; "
            + "; ".join(parts))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def moved(metrics: list[dict], keys: tuple[str, ...] = ("loss", "cos_adv")) -> str:
    """First -> last logged value of each key; CheckFailed unless every value is finite and
    each key moved by more than MOVED (a run whose loss stays put is not learning)."""
    if len(metrics) < 2:
        raise CheckFailed(f"{len(metrics)} logged steps: need at least 2 to see a change")
    parts = []
    for key in keys:
        values = [m[key] for m in metrics]
        if not all(math.isfinite(v) for v in values):
            raise CheckFailed(f"{key} is not finite: {values}")
        first, last = values[0], values[-1]
        if abs(last - first) <= MOVED:
            raise CheckFailed(f"{key} did not move: {first:.4f} -> {last:.4f}")
        parts.append(f"{key} {first:.4f} -> {last:.4f}")
    steps = f"steps {metrics[0]['step']}-{metrics[-1]['step']}"
    return f"{steps}: " + ", ".join(parts) + f"; {metrics[-1]['images_per_s']:.0f} img/s"


def parse_ddp_cli(path: Path) -> Callable[[str], str]:
    def parse(out: str) -> str:
        metrics = read_metrics(path)
        if not all(math.isfinite(m["loss"]) for m in metrics):
            raise CheckFailed(f"loss not finite: {[m['loss'] for m in metrics]}")
        return (f"{metrics[-1]['step']} steps under torchrun (1 process: train() takes no "
                f"process group, see ddp-syncbn); loss {metrics[-1]['loss']:.4f}")
    return parse


def parse_ddp_probe(out: str) -> str:
    r = json_line(out)
    if r["backend"] != "nccl" or r["sync_bn_layers"] == 0 or not r["ddp"]:
        raise CheckFailed(f"not NCCL DDP with SyncBatchNorm: {r}")
    if not all(math.isfinite(v) for v in r["losses"]):
        raise CheckFailed(f"loss not finite: {r['losses']}")
    return (f"{r['backend']}, world {r['world']}, {r['sync_bn_layers']} SyncBatchNorm layers, "
            f"DDP; {len(r['losses'])} steps, loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}")


def parse_serve(out: str) -> str:
    r = json_line(out)
    if r["embed_status"] != 200 or r["device"] != "cuda":
        raise CheckFailed(f"/embed {r['embed_status']}, /readyz device {r['device']}")
    return f"/embed 200 ({r['dim']}-d), /readyz device cuda, {r['ready_s']:.1f} s to ready"


# -- the steps --------------------------------------------------------------------------------


def steps(args: argparse.Namespace, work: Path) -> list[Step]:
    """The checks in order, writing under `work`: the quick functional ones first, the long
    benchmark last (it gets what is left of the budget, up to its own limit)."""
    py, data = sys.executable, str(args.data)
    cli = [py, "-m", "byorl.cli"]
    small = ["--data", data, "--arch", "preact_resnet18", "--batch-size", "256", "--attack",
             "apgd", "--steps", "5", "--compile", "off", "--epochs", "2", "--warmup-epochs",
             "0.2", "--device", "cuda"]
    me = [py, str(Path(__file__).resolve())]
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    bench_json = work / "bench_train.json"
    return [
        Step("ort-cuda-vs-cpu", [*me, "ort", "--model", str(args.model)], 40, parse_ort),
        Step("faiss-gpu-vs-cpu", [*me, "faiss"], 40, parse_faiss),
        Step("ddp-cli", [*torchrun, "-m", "byorl.cli", "train", "--out",
                         str(work / "ddp"), *small, "--max-steps", "20", "--log-every", "5"],
             50, parse_ddp_cli(work / "ddp" / "metrics.jsonl")),
        Step("ddp-syncbn", [*torchrun, *me[1:], "ddp", "--steps", "5"], 40, parse_ddp_probe),
        Step("train-300", [*cli, "train", "--out", str(work / "train"), *small, "--max-steps",
                           "300", "--log-every", "10"], 110,
             lambda out: moved(read_metrics(work / "train" / "metrics.jsonl"))),
        Step("export", [*cli, "export", str(work / "train"), "--out", str(work / "model")], 30,
             lambda out: last_lines(out, 1)),
        Step("embed-cuda", [*me, "serve", "--model-dir", str(work / "model"),
                            "--work", str(work / "service")], 40, parse_serve),
        Step("bench-train-paper", [py, str(ROOT / "bench" / "bench_train.py"), "--device", "cuda",
                                   "--arch", "preact_resnet34", "--width", "2", "--proj-hidden",
                                   "4096", "--proj-dim", "256", "--batch", "512", "--attack",
                                   "apgd", "--steps", "40", "--precision", "bf16", "--variants",
                                   "eager,compiled", "--warmup", "1", "--rounds", "2", "--json",
                                   str(bench_json)], 170,
             lambda out: parse_bench_train(bench_json)),
    ]


def card_name() -> str:
    """The GPU's name as nvidia-smi gives it ('unknown-card' without one)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown-card"
    return out.strip().splitlines()[0] if out.strip() else "unknown-card"


def check_all(args: argparse.Namespace) -> int:
    """Run the steps, print each row as it ends and the table at the end, write the table."""
    args.work = str(Path(args.work).resolve()) if args.work else tempfile.mkdtemp(
        prefix="gpu_check-")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    chosen = [s for s in steps(args, Path(args.work)) if not args.only or s.name in args.only]
    # decoded images cached in the scratch folder: nothing written outside it and results/
    env = {**os.environ, "BYORL_CACHE": str(Path(args.work) / "cache")}
    rows = run_steps(chosen, args.budget, env, lambda r: print(
        f"[{'PASS' if r.passed else 'FAIL'}] {r.step} ({r.seconds:.0f} s): {r.detail}",
        flush=True))
    card = args.card or card_name()
    table = render_table(rows, f"GPU check: {card}, {datetime.date.today().isoformat()}")
    path = report_path(Path(args.out_dir), card, datetime.date.today())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    print(table + f"\n-> {path}")
    return 0 if all(r.passed for r in rows) else 1


# -- the probes (run on the GPU machine by the steps above) -----------------------------------


def timed_rate(fn, n: int, rounds: int = 3) -> float:
    """Items per second of `fn()` (n items a call), the best of `rounds` after one warm-up."""
    fn()
    best = math.inf
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def probe_ort(args: argparse.Namespace) -> None:
    """ONNX Runtime's CUDA provider against its CPU provider on the same images."""
    import numpy as np

    from byorl.model_dir import embed, load_onnx_session

    images = np.random.default_rng(0).integers(0, 256, (args.n, 3, 32, 32), dtype=np.uint8)
    cuda, cpu = load_onnx_session(args.model, device="cuda"), load_onnx_session(args.model,
                                                                               device="cpu")
    a, b = embed(cuda, images, args.batch), embed(cpu, images, args.batch)
    print(json.dumps({
        "provider": cuda.get_providers()[0], "batch": args.batch,
        "max_abs_diff": float(np.abs(a - b).max()), "max_abs": float(np.abs(b).max()),
        "cuda_images_per_s": timed_rate(lambda: embed(cuda, images, args.batch), args.n),
        "cpu_images_per_s": timed_rate(lambda: embed(cpu, images, args.batch), args.n, 1)}))


def probe_faiss(args: argparse.Namespace) -> None:
    """The project's EmbeddingIndex on the GPU against the same index on the CPU."""
    import faiss
    import numpy as np

    from byorl.index.faiss_index import EmbeddingIndex, gpu_available

    if not gpu_available():
        raise SystemExit(f"FAISS {faiss.__version__} sees no GPU (is faiss-gpu installed?)")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    q = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    keys = [str(i) for i in range(args.n)]
    found, ms = {}, {}
    for where in ("gpu", "cpu"):
        index = EmbeddingIndex(args.dim, "gpu-check", use_gpu=where == "gpu")
        index.add(keys, x)
        found[where] = [[h.key for h in hits] for hits in index.search(q, args.k)]
        ms[where] = 1000 / timed_rate(lambda index=index: index.search(q, args.k), args.queries)
    same = np.mean([set(g) == set(c) for g, c in zip(found["gpu"], found["cpu"], strict=True)])
    print(json.dumps({"n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k,
                      "same_topk": float(same), "gpu_ms_per_query": ms["gpu"],
                      "cpu_ms_per_query": ms["cpu"]}))


def probe_ddp(args: argparse.Namespace) -> None:
    """Under torchrun: NCCL, train.py's networks built for DDP (SyncBatchNorm, the attack's
    extra passes agreed by all ranks) and a few of its training steps on random images."""
    import torch
    import torch.distributed as dist

    from byorl.training.config import TrainConfig
    from byorl.training.train import build_networks, train_step

    dist.init_process_group("nccl")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    cfg = TrainConfig(device="cuda", compile="off")
    cfg.model.arch, cfg.attack.steps, cfg.optim.batch_size = "preact_resnet18", 5, 128
    torch.manual_seed(0)
    nets = build_networks(cfg, device, distributed=True)
    x = torch.rand(cfg.optim.batch_size // dist.get_world_size(), 3, 32, 32, device=device)
    losses = [train_step(nets, x, cfg, 0.1, 0.99, True).loss.item() for _ in range(args.steps)]
    sync_bn = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in nets.online.modules())
    if dist.get_rank() == 0:
        print(json.dumps({"backend": dist.get_backend(), "world": dist.get_world_size(),
                          "sync_bn_layers": sync_bn, "losses": losses,
                          "ddp": isinstance(nets.model,
                                            torch.nn.parallel.DistributedDataParallel)}))
    dist.destroy_process_group()


def sample_jpeg() -> bytes:
    """One CIFAR-10 JPEG of the sample shipped in tests/data (its bytes unchanged)."""
    import numpy as np

    with np.load(SAMPLE) as f:
        return f["jpeg"][f["offsets"][0] : f["offsets"][1]].tobytes()


def http(url: str, body: dict | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of a GET, or of a POST of `body` as JSON."""
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def probe_serve(args: argparse.Namespace) -> None:
    """uvicorn on the exported model with BYORL_DEVICE=cuda: /readyz's device, one /embed."""
    env = {**os.environ, "BYORL_DEVICE": "cuda", "BYORL_MODEL_DIR": str(args.model_dir.resolve()),
           "BYORL_DATA_DIR": str(Path(args.work) / "data")}
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "byorl.service.main:app",
                               "--host", "127.0.0.1", "--port", str(args.port)], cwd=ROOT, env=env)
    base, start = f"http://127.0.0.1:{args.port}", time.monotonic()
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"uvicorn exited with {server.returncode}")
            try:
                status, ready = http(f"{base}/readyz")
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        ready_s = time.monotonic() - start
        image = base64.b64encode(sample_jpeg()).decode()
        status, answer = http(f"{base}/embed", {"images": [image]})
        print(json.dumps({"embed_status": status, "dim": answer.get("dim"),
                          "device": ready.get("device"), "ready_s": ready_s}))
    finally:
        server.terminate()
        server.wait(timeout=30)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="every step, the table (what gpu_check.sh calls)")
    run.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 .tar.gz")
    run.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    run.add_argument("--work", default=None, help="scratch folder (default: a fresh temp dir)")
    run.add_argument("--out-dir", type=Path, default=ROOT / "results" / "gpu")
    run.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps")
    run.add_argument("--card", default=None, help="GPU name for the report (default: nvidia-smi)")
    run.add_argument("--only", type=lambda s: s.split(","), default=None,
                     help="comma-separated step names (default: all)")
    ort = sub.add_parser("ort")
    ort.add_argument("--model", type=Path, required=True)
    ort.add_argument("--n", type=int, default=2048)
    ort.add_argument("--batch", type=int, default=256)
    fa = sub.add_parser("faiss")
    fa.add_argument("--n", type=int, default=200_000)
    fa.add_argument("--dim", type=int, default=256)
    fa.add_argument("--queries", type=int, default=1000)
    fa.add_argument("--k", type=int, default=10)
    ddp = sub.add_parser("ddp")
    ddp.add_argument("--steps", type=int, default=5)
    serve = sub.add_parser("serve")
    serve.add_argument("--model-dir", type=Path, required=True)
    serve.add_argument("--work", type=Path, required=True)
    serve.add_argument("--port", type=int, default=8765)
    args = p.parse_args(argv)
    if args.command == "run":
        if not args.budget > 0:
            p.error(f"--budget must be > 0, got {args.budget}")
        names = [s.name for s in steps(args, Path("."))]
        if args.only and (unknown := set(args.only) - set(names)):
            p.error(f"unknown steps {sorted(unknown)}; known: {', '.join(names)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "run":
        return check_all(args)
    {"ort": probe_ort, "faiss": probe_faiss, "ddp": probe_ddp, "serve": probe_serve}[
        args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
