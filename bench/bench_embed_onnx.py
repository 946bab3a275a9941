"""Embedding throughput of ONNX Runtime against PyTorch eager, same encoder, same thread count,
batch sizes 1, 32 and 256 on the CPU; measured side by side in one run, interleaved in rounds
(best round of each kept) so background load hits both alike.

    python bench/bench_embed_onnx.py                                   # random preact_resnet_small
    python bench/bench_embed_onnx.py --arch preact_resnet18 --threads 2
    python bench/bench_embed_onnx.py --model models/default            # an exported directory
"""

import argparse
import os
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import onnxruntime as ort
import torch

from byorl.model_dir import INPUT_NAME, OUTPUT_NAME, load_onnx_session
from byorl.training.checkpoint import load_torch_encoder
from byorl.training.export import onnx_bytes
from byorl.training.models import create_model


def throughput(run: Callable[[], object], batch: int, seconds: float) -> float:
    """Images per second of `run` (one batch per call), after one warm-up call."""
    run()
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        run()
        done += batch
    return done / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="an exported model directory (default: a random --arch)")
    p.add_argument("--arch", default="preact_resnet_small")
    p.add_argument("--width", type=int, default=1)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    if args.model:
        encoder = load_torch_encoder(args.model)
        session = load_onnx_session(args.model, threads=args.threads, device="cpu")
        name = args.model
    else:
        torch.manual_seed(0)
        encoder = create_model(args.arch, args.width).eval()
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        session = ort.InferenceSession(onnx_bytes(encoder, (3, 32, 32)), options,
                                       providers=["CPUExecutionProvider"])
        name = f"{args.arch} x{args.width} (random weights)"
    print(f"{name}: {sum(p.numel() for p in encoder.parameters()) / 1e6:.2f} M parameters, "
          f"{args.threads} threads for both, torch {torch.__version__}, onnxruntime "
          f"{ort.__version__}, best of {args.rounds} interleaved rounds of {args.seconds} s")
    print(f"{'batch':>6} {'torch img/s':>12} {'onnx img/s':>11} {'onnx/torch':>11}")
    for batch in args.batches:
        x = torch.rand(batch, 3, 32, 32)
        runs = {"torch": partial(encoder, x),
                "onnx": partial(session.run, [OUTPUT_NAME], {INPUT_NAME: x.numpy()})}
        best = dict.fromkeys(runs, 0.0)
        with torch.inference_mode():
            for _ in range(args.rounds):
                for what, run in runs.items():
                    best[what] = max(best[what], throughput(run, batch, args.seconds))
            diff = np.abs(runs["onnx"]()[0] - runs["torch"]().numpy()).max()
        print(f"{batch:>6} {best['torch']:>12.1f} {best['onnx']:>11.1f} "
              f"{best['onnx'] / best['torch']:>10.2f}x   (max |diff| {diff:.1e})")

if __name__ == "__main__":
    main()
