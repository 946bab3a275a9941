"""How long each kind of audit takes through the API, end to end (submit -> report), on the
bundled default model: a real uvicorn on loopback, jobs in the api's own processes (no Redis),
a fresh data directory, the CIFAR-10 sample of tests/data/ in a seeded random order. One head
(non-robust, fitted on 500 images) is audited in each robustness mode, white-box and
black-box; a gallery of 500 images gets one retrieval audit. The README's audit section
quotes this table.

    python bench/bench_audit.py               # 100 audited images (quick + full: minutes)
    python bench/bench_audit.py --images 20   # a shorter look
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from byorl import Client  # noqa: E402
from tests.live import free_port, kill_group, start_process, uvicorn_argv, wait_ready  # noqa: E402

SAMPLE = ROOT / "tests" / "data" / "cifar10-test-sample.npz"


def sample() -> tuple[list[bytes], np.ndarray, list[str]]:
    """The sample's JPEG files as bytes, their labels and the class names."""
    d = np.load(SAMPLE)
    jpeg, offsets = d["jpeg"], d["offsets"]
    files = [jpeg[a:b].tobytes() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return files, d["labels"], [str(c) for c in d["classes"]]


def timed(handle) -> tuple[float, dict]:
    start = time.monotonic()
    job = handle.wait(timeout=7200, poll=0.5)
    return time.monotonic() - start, job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100, help="images per robustness audit")
    parser.add_argument("--queries", type=int, default=8, help="queries of the retrieval audit")
    args = parser.parse_args()

    files, labels, classes = sample()
    order = np.random.default_rng(0).permutation(len(files))  # the sample is sorted by class
    files, labels = [files[i] for i in order], labels[order]
    fit, audited = slice(0, 500), slice(500, 500 + args.images)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = {**os.environ, "BYORL_DATA_DIR": str(Path(tmp) / "data"), "BYORL_REDIS_URL": "",
               "BYORL_MODEL_DIR": str(ROOT / "models" / "default")}
        proc = start_process(uvicorn_argv(port), env, Path(tmp) / "api.log", Path(tmp))
        url = f"http://127.0.0.1:{port}"
        rows = []
        try:
            wait_ready(url)
            with Client(url) as c:
                seconds, job = timed(c.fit_head(classes, labels[fit].tolist(), files[fit]))
                head_id = job.id
                rows.append(("fit a non-robust head (500 images)", "", seconds, ""))
                for mode, method in (("quick", "white-box"), ("full", "white-box"),
                                     ("quick", "black-box"), ("full", "black-box")):
                    seconds, job = timed(c.audit(
                        "robustness", files[audited], head_id=head_id,
                        labels=labels[audited].tolist(), mode=mode, method=method))
                    report = c.report(job.id)
                    rows.append((f"robustness, {method}, mode {mode}", args.images, seconds,
                                 f"clean {report['clean_accuracy']:.3f}, robust "
                                 f"{report['robust_accuracy']:.3f}, upper_bound "
                                 f"{report['upper_bound']}"))
                c.create_gallery("bench")
                c.add("bench", {f"img{i}": f for i, f in enumerate(files[fit])})
                queries = files[audited][:args.queries]
                seconds, job = timed(c.audit("retrieval", queries, gallery="bench"))
                report = c.report(job.id)
                rows.append(("retrieval, white-box (defaults)", len(queries), seconds,
                             f"top-k overlap {report['topk_overlap_adversarial']:.3f}, upper_bound "
                             f"{report['upper_bound']}"))
        finally:
            kill_group(proc)
    load = os.getloadavg()[0]
    print(f"\naudits through the API on models/default ({os.cpu_count()} cores, load {load:.1f})")
    print("| audit | images | seconds | result |\n|---|---|---|---|")
    for name, n, seconds, result in rows:
        print(f"| {name} | {n} | {seconds:.1f} | {result} |")


if __name__ == "__main__":
    main()
