"""bench/gpu_check.py's CPU-side parts: arguments, steps under time limits and one budget, the
parsing of each step's output, the table. The GPU steps themselves need a CUDA machine."""

import datetime
import json
import math
import re
import sys
import time
from pathlib import Path

import pytest

from bench import gpu_check
from bench.gpu_check import (
    CheckFailed,
    Row,
    Step,
    moved,
    parse_args,
    parse_bench_train,
    parse_ddp_cli,
    parse_ddp_probe,
    parse_faiss,
    parse_ort,
    parse_serve,
    render_table,
    report_path,
    run_step,
    run_steps,
)

ROOT = Path(__file__).resolve().parents[2]


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_run_arguments_default_to_a_budget_under_8_minutes_and_refuse_unknown_steps(capsys):
    args = parse_args(["run"])
    assert args.budget == gpu_check.BUDGET_S and args.budget + 30 < 8 * 60  # + start, table
    assert args.data == ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
    assert args.model == ROOT / "models" / "default" and args.work is None  # a temp dir then
    chosen = parse_args(["run", "--only", "export,embed-cuda", "--work", "w", "--budget", "60"])
    assert chosen.only == ["export", "embed-cuda"] and chosen.work == "w" and chosen.budget == 60
    for bad, message in ((["--only", "export,bogus"], "unknown steps ['bogus']"),
                         (["--budget", "0"], "--budget must be > 0")):
        with pytest.raises(SystemExit) as exit_:
            parse_args(["run", *bad])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_steps_call_options_their_commands_have():
    """Every flag a step passes to `byorl train` exists in the CLI, and every flag of the
    bench_train.py step in its parser: a renamed option would only show on the GPU."""
    import typer

    from byorl.cli import app

    click_train = typer.main.get_command(app).commands["train"]
    train_flags = {o for p in click_train.params for o in p.opts}
    bench_flags = set(re.findall(r'add_argument\("(--[a-z-]+)"',
                                 (ROOT / "bench" / "bench_train.py").read_text()))
    steps = {s.name: s for s in gpu_check.steps(parse_args(["run", "--work", "w"]), Path("w"))}
    assert list(steps) == ["ort-cuda-vs-cpu", "faiss-gpu-vs-cpu", "ddp-cli", "ddp-syncbn",
                           "train-300", "export", "embed-cuda", "bench-train-paper"]
    for name in ("ddp-cli", "train-300"):
        argv = steps[name].argv
        flags = {a for a in argv[argv.index("train") + 1:] if a.startswith("--")}
        assert flags <= train_flags, flags - train_flags
    bench = steps["bench-train-paper"].argv
    assert {a for a in bench if a.startswith("--")} <= bench_flags
    assert bench[bench.index("--arch") + 1 :][:1] == ["preact_resnet34"]  # the paper's config
    assert [bench[bench.index(f) + 1] for f in ("--width", "--batch", "--steps", "--precision")
            ] == ["2", "512", "40", "bf16"]


def test_a_step_that_runs_too_long_is_killed_with_its_children_and_becomes_a_fail_row():
    """The limit kills the whole process group (torchrun's workers, the probe's uvicorn)."""
    step = Step("slow", ["bash", "-c", "echo started >&2; sleep 60 & wait"], 5, lambda out: out)
    start = time.monotonic()
    row = run_step(step, deadline=time.monotonic() + 100)
    assert time.monotonic() - start < 15
    assert not row.passed and row.detail == "timed out after 5 s: started"
    assert 5 <= row.seconds < 15


def test_failures_become_fail_rows_with_their_reason():
    deadline = time.monotonic() + 100
    crashed = run_step(Step("crash", python("import sys; print('loading'); "
                                            "sys.exit('CUDA error: no kernel image')"), 30, str),
                       deadline)
    assert crashed == Row("crash", False, "exit 1: CUDA error: no kernel image", crashed.seconds)

    def refuse(out):
        raise CheckFailed(f"outputs differ: {out.strip()}")

    refused = run_step(Step("parity", python("print('diff 0.5')"), 30, refuse), deadline)
    assert not refused.passed and refused.detail == "CheckFailed: outputs differ: diff 0.5"
    garbled = run_step(Step("garbled", python("print('{not json')"), 30, parse_ort), deadline)
    assert not garbled.passed and garbled.detail.startswith("JSONDecodeError")
    fine = run_step(Step("fine", python("print('ok')"), 30, lambda out: out.strip()), deadline)
    assert fine.passed and fine.detail == "ok"


def test_steps_share_one_budget_and_the_rest_are_skipped_once_it_is_spent():
    seen = []
    rows = run_steps([Step("a", python("import time; time.sleep(2)"), 60, lambda out: "slept"),
                      Step("b", python("print('never')"), 60, lambda out: "ran")],
                     budget_s=6, report=seen.append)
    assert rows == seen  # each row reported as it ends
    assert rows[0].passed and rows[0].detail == "slept"
    assert rows[1] == Row("b", False, "skipped: the time budget is spent", 0.0)


def test_table_is_markdown_with_a_row_per_step_and_the_pass_count():
    rows = [Row("ort-cuda-vs-cpu", True, "max abs diff 1.2e-04 | cuda 9000 img/s", 12.345),
            Row("train-300", False, "timed out after 110 s:\nlast line", 110.0)]
    assert render_table(rows, "GPU check: NVIDIA H100, 2026-12-07") == (
        "# GPU check: NVIDIA H100, 2026-12-07\n\n"
        "| step | result | seconds | detail |\n|---|---|---|---|\n"
        "| ort-cuda-vs-cpu | PASS | 12.3 | max abs diff 1.2e-04 \\| cuda 9000 img/s |\n"
        "| train-300 | FAIL | 110.0 | timed out after 110 s: last line |\n\n"
        "1 of 2 steps passed.\n")
    assert report_path(Path("results/gpu"), "NVIDIA H100 80GB HBM3", datetime.date(2026, 12, 7)
                       ) == Path("results/gpu/gpu_check-NVIDIA-H100-80GB-HBM3-2026-12-07.md")


def test_check_all_writes_the_table_and_fails_when_a_step_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "steps", lambda args, work: [
        Step("good", python("print('fine')"), 30, lambda out: out.strip()),
        Step("bad", python("raise SystemExit(4)"), 30, str)])
    args = parse_args(["run", "--work", str(tmp_path / "w"), "--out-dir", str(tmp_path),
                       "--card", "NVIDIA H100"])
    assert gpu_check.check_all(args) == 1
    (written,) = tmp_path.glob("gpu_check-NVIDIA-H100-*.md")
    table = written.read_text()
    assert "| good | PASS |" in table and "| bad | FAIL |" in table and "exit 4" in table
    assert table in capsys.readouterr().out


ORT_OUT = """2026-12-07 23:10:01.1 [W:onnxruntime:, session_state.cc:1166] Some nodes were not
{"provider": "CUDAExecutionProvider", "batch": 256, "max_abs_diff": 0.00021, "max_abs": 3.5, \
"cuda_images_per_s": 41234.5, "cpu_images_per_s": 2345.6}
"""


def test_ort_parity_passes_within_tf32_tolerance_and_fails_beyond_or_on_the_cpu():
    assert parse_ort(ORT_OUT) == ("max abs diff 2.10e-04 (6.0e-05 of max |cpu|); cuda 41234 "
                                  "img/s, cpu 2346 img/s (17.6x), batch 256")
    with pytest.raises(CheckFailed, match="outputs differ"):
        parse_ort(ORT_OUT.replace("0.00021", "0.1"))
    with pytest.raises(CheckFailed, match="runs on CPUExecutionProvider"):
        parse_ort(ORT_OUT.replace('"CUDAExecutionProvider"', '"CPUExecutionProvider"'))
    with pytest.raises(CheckFailed, match="no JSON line"):
        parse_ort("Segmentation fault\n")


def test_faiss_parity_needs_the_same_top_k():
    out = json.dumps({"n": 200000, "dim": 256, "queries": 1000, "k": 10, "same_topk": 1.0,
                      "gpu_ms_per_query": 0.004, "cpu_ms_per_query": 0.9})
    assert parse_faiss(out) == ("same top-10 ids for 100.00% of 1000 queries over 200000 x 256; "
                                "gpu 0.0040 ms/query, cpu 0.9000 (225.0x)")
    with pytest.raises(CheckFailed, match="top-k differ"):
        parse_faiss(out.replace('"same_topk": 1.0', '"same_topk": 0.97'))


def test_bench_train_row_reads_its_json(tmp_path):
    """What bench_train.py --json writes (its keys), on the paper's config: 97 steps an epoch,
    97,000 for 1000 epochs; 4 s a step is 107.8 h, 2.5 s 67.4 h."""
    path = tmp_path / "bench_train.json"
    steps_1000 = 1000 * (50_000 // 512)

    def variant(s_per_step, warmup_s):
        return {"s_per_step": s_per_step, "warmup_s": warmup_s, "all_s": [s_per_step] * 2,
                "images_per_s": 512 / s_per_step, "tflops": 970 / s_per_step,
                "mfu": 970 / s_per_step / 989, "days_1000_epochs": steps_1000 * s_per_step / 86400}

    path.write_text(json.dumps({
        "args": {}, "device": "NVIDIA H100 80GB HBM3", "bf16": True, "flops_per_step": 970e12,
        "peak_tflops": 989.0, "peak_source": "NVIDIA H100 80GB HBM3 dense bf16 data sheet",
        "results": {"eager": variant(4.0, 9.0), "compiled": variant(2.5, 95.0)}}))
    assert parse_bench_train(path) == (
        "970.0 TFLOP/step, peak 989.0 TFLOP/s; eager 128 img/s, MFU 24.5%, warm-up 9 s, 1000 "
        "epochs 107.8 h; compiled 205 img/s, MFU 39.2%, warm-up 95 s, 1000 epochs 67.4 h; "
        "compiled/eager 1.60x")


def metrics(losses, cos_adv):
    """metrics.jsonl records as train.py writes them (every key it logs)."""
    return [{"step": 10 * (i + 1), "epoch": (i + 1) / 19.5, "loss": loss, "cos_clean": 0.9,
             "cos_adv": cos, "pred_std": 0.04, "lr": 0.1, "tau": 0.996, "images_per_s": 2500.0}
            for i, (loss, cos) in enumerate(zip(losses, cos_adv, strict=True))]


def test_a_run_moved_when_its_loss_and_cos_adv_changed_and_stayed_finite():
    assert moved(metrics([3.91, 3.5, 3.12], [0.021, 0.1, 0.437])) == (
        "steps 10-30: loss 3.9100 -> 3.1200, cos_adv 0.0210 -> 0.4370; 2500 img/s")
    for losses, cos, message in (([3.9, math.nan], [0.0, 0.4], "loss is not finite"),
                                 ([3.9, 3.9005], [0.0, 0.4], "loss did not move"),
                                 ([3.9, 3.1], [0.2, 0.2], "cos_adv did not move"),
                                 ([3.9], [0.2], "1 logged steps")):
        with pytest.raises(CheckFailed, match=message):
            moved(metrics(losses, cos))


def test_ddp_rows_read_the_run_and_the_probe(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in metrics([3.9, 3.7], [0.1, 0.2])))
    assert parse_ddp_cli(path)("") == ("20 steps under torchrun (1 process: train() takes no "
                                       "process group, see ddp-syncbn); loss 3.7000")
    probe = {"backend": "nccl", "world": 1, "sync_bn_layers": 42, "ddp": True,
             "losses": [3.95, 3.9, 3.88]}
    assert parse_ddp_probe(json.dumps(probe)) == (
        "nccl, world 1, 42 SyncBatchNorm layers, DDP; 3 steps, loss 3.9500 -> 3.8800")
    for broken in ({"backend": "gloo"}, {"sync_bn_layers": 0}, {"losses": [3.9, math.inf]}):
        with pytest.raises(CheckFailed):
            parse_ddp_probe(json.dumps({**probe, **broken}))


def test_embed_row_needs_200_and_the_cuda_provider():
    ok = {"embed_status": 200, "dim": 1024, "device": "cuda", "ready_s": 6.25}
    assert parse_serve(json.dumps(ok)) == "/embed 200 (1024-d), /readyz device cuda, 6.2 s to ready"
    for broken in ({"device": "cpu"}, {"embed_status": 500}):
        with pytest.raises(CheckFailed):
            parse_serve(json.dumps({**ok, **broken}))
