"""The attack suite's passes through an exported encoder + linear head, side by side in
alternating rounds: the weights in NCHW vs channels-last memory format (what
`evaluate_robustness` uses) for a forward pass (the checks' predictions) and a forward +
input-gradient pass (APGD, MultiTargeted), with the largest output and gradient difference
between the two; and the forward pass in ONNX Runtime (what Square queries in an experiment
cell on a model directory) against the faster PyTorch format.

    python bench/bench_attack_passes.py --model-dir results/reproduction/encoders/byorl-pgd3
"""

import argparse
import time

import torch
from torch import nn
from torch.nn import functional as F

from byorl.model_dir import ONNX, read_card
from byorl.training.checkpoint import load_torch_encoder
from byorl.training.linear_classifier import Classifier
from byorl.training.onnx_encoder import OnnxRuntimeEncoder


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def input_gradient(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long))
    return torch.autograd.grad(loss, x)[0]


def seconds(fn, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="results/reproduction/encoders/byorl-pgd3")
    p.add_argument("--batch", type=int, default=64, help="the suite's eval_batch_size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=5, help="passes per round and format")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    head = nn.Linear(read_card(args.model_dir)["embedding_dim"], 10)
    model = Classifier(load_torch_encoder(args.model_dir), head).eval()
    onnx = Classifier(OnnxRuntimeEncoder(f"{args.model_dir}/{ONNX}", args.threads), head).eval()
    x = torch.rand(args.batch, *read_card(args.model_dir)["input_size"])
    ref_y, ref_g = forward(model, x), input_gradient(model, x)
    times = {fmt: {"forward": [], "gradient": []} for fmt in ("nchw", "channels_last")}
    onnx_times = []
    for _ in range(args.rounds):
        forward(onnx, x)
        onnx_times.append(seconds(lambda: forward(onnx, x), args.reps))
        for fmt, memory_format in (("nchw", torch.contiguous_format),
                                   ("channels_last", torch.channels_last)):
            model.to(memory_format=memory_format)
            forward(model, x), input_gradient(model, x)  # warm-up of this format
            times[fmt]["forward"].append(seconds(lambda: forward(model, x), args.reps))
            times[fmt]["gradient"].append(seconds(lambda: input_gradient(model, x), args.reps))
    dy = (forward(model, x) - ref_y).abs().max().item()
    dy_onnx = (forward(onnx, x) - ref_y).abs().max().item()
    dg = ((input_gradient(model, x) - ref_g).abs().max() / ref_g.abs().max()).item()
    print(f"{args.model_dir}: batch {args.batch}, {args.threads} thread(s), best of {args.rounds} "
          f"rounds of {args.reps}")
    for kind in ("forward", "gradient"):
        a, b = min(times["nchw"][kind]), min(times["channels_last"][kind])
        print(f"{kind:>9}: NCHW {a * 1000:7.1f} ms  channels-last {b * 1000:7.1f} ms  "
              f"speed-up {a / b:.2f}x")
    best = min(min(times["nchw"]["forward"]), min(times["channels_last"]["forward"]))
    print(f"  forward: ONNX Runtime {min(onnx_times) * 1000:.1f} ms, {best / min(onnx_times):.2f}x "
          "the faster PyTorch format")
    print(f"max |logits difference| channels-last {dy:.1e}, ONNX Runtime {dy_onnx:.1e}; max "
          f"input-gradient difference {dg:.1e} of the largest")


if __name__ == "__main__":
    main()
