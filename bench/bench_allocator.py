"""BYORL training steps under glibc's malloc vs jemalloc as the `byorl` command preloads it
(training/allocator.py), side by side: two worker processes with the same networks and batch
(the shipped recipe's defaults: small pre-act ResNet, batch 128, PGD-3, views concatenated),
one step each in turn, so that a background load weighs on both alike. Reports per allocator
the median seconds per step, the kernel's share of the CPU time, page faults per step and the
peak resident size.

    python bench/bench_allocator.py --rounds 8
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from byorl.training.allocator import OPT_OUT, find_jemalloc, preload_env


def worker(args) -> None:
    """Read a line, run one training step, answer with its wall, user and system seconds and
    minor page faults (JSON), until stdin closes."""
    import torch
    from bench_train import project_runner

    torch.set_num_threads(args.threads)
    step = project_runner(args, torch.device("cpu"), compiled=False)
    for _ in sys.stdin:
        before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t
        print(json.dumps({"wall": wall, "user": after.ru_utime - before.ru_utime,
                          "sys": after.ru_stime - before.ru_stime,
                          "faults": after.ru_minflt - before.ru_minflt,
                          "max_rss_mib": after.ru_maxrss / 1024}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="preact_resnet_small")
    p.add_argument("--width", type=int, default=1)
    p.add_argument("--proj-hidden", type=int, default=1024)
    p.add_argument("--proj-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--attack", default="pgd")
    p.add_argument("--steps", type=int, default=3, help="attack steps K")
    p.add_argument("--bn-views", default="concat")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.device, args.precision = "cpu", "fp32"
    if args.worker:
        return worker(args)

    library = find_jemalloc()
    if library is None:
        raise SystemExit("no jemalloc on this machine (Debian: apt-get install libjemalloc2)")
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    envs = {"glibc malloc": {**base, OPT_OUT: "system"},
            "jemalloc (byorl's)": preload_env(base, library)}
    command = [sys.executable, __file__, "--worker", *sys.argv[1:]]
    workers = {name: subprocess.Popen(command, env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
               for name, env in envs.items()}

    def step(name: str) -> dict:
        workers[name].stdin.write("step\n")
        workers[name].stdin.flush()
        return json.loads(workers[name].stdout.readline())

    samples = {name: [] for name in workers}
    for i in range(args.warmup + args.rounds):
        for name in workers:
            sample = step(name)
            if i >= args.warmup:
                samples[name].append(sample)
    for w in workers.values():
        w.stdin.close()
        w.wait()

    results = {}
    for name, ss in samples.items():
        cpu = sum(s["user"] + s["sys"] for s in ss)
        results[name] = {"s_per_step": statistics.median(s["wall"] for s in ss),
                         "kernel_share": sum(s["sys"] for s in ss) / cpu,
                         "faults_per_step": statistics.median(s["faults"] for s in ss),
                         "max_rss_mib": ss[-1]["max_rss_mib"]}
    glibc, jemalloc = results.values()
    print(f"batch {args.batch}, {args.attack}-{args.steps}, {args.arch} x{args.width}, "
          f"{args.threads} thread(s), {args.rounds} rounds after {args.warmup} warm-up")
    print("| allocator | s/step | images/s | kernel share of CPU | page faults/step | "
          "peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['s_per_step']:.2f} | {args.batch / r['s_per_step']:.1f} | "
              f"{r['kernel_share']:.0%} | {r['faults_per_step']:.0f} | {r['max_rss_mib']:.0f} |")
    print(f"jemalloc speed-up: {glibc['s_per_step'] / jemalloc['s_per_step']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "results": results}, indent=2,
                                        default=str))


if __name__ == "__main__":
    main()
