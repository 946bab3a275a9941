"""Any ONNX encoder as a PyTorch module, for audits of models this project did not train.

White-box: `convert` turns the ONNX graph into PyTorch modules with onnx2torch (after moving
it to opset 17 and dropping Reshape's `allowzero` where its target shape is a constant without
zeros, where the flag changes nothing: onnx2torch supports neither newer ops nor the flag);
`parity_error` checks the conversion against ONNX Runtime before its gradients are trusted.
Black-box: `OnnxRuntimeEncoder` runs the graph in ONNX Runtime itself (query-only: no
gradients), for Square.
"""

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper, version_converter
from torch import nn

OPSET = 17  # what onnx2torch converts
PARITY_TOLERANCE = 1e-4  # max |PyTorch - ONNX Runtime|, relative to the largest |output| (>= 1)


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(a.t)
    return out


def _drop_neutral_allowzero(model: onnx.ModelProto) -> onnx.ModelProto:
    """Reshape's allowzero=1 only differs from 0 where the target shape holds a 0."""
    constants = _constants(model.graph)
    for node in model.graph.node:
        shape = constants.get(node.input[1]) if node.op_type == "Reshape" else None
        if shape is not None and (shape != 0).all():
            for a in [a for a in node.attribute if a.name == "allowzero"]:
                node.attribute.remove(a)
    return model


def convert(path: str) -> nn.Module:
    """The ONNX file as a PyTorch module in eval mode (raises when onnx2torch cannot)."""
    from onnx2torch import convert as onnx2torch

    model = onnx.load(path)
    if max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) > OPSET:
        model = version_converter.convert_version(model, OPSET)
    return onnx2torch(_drop_neutral_allowzero(model)).eval()


class OnnxRuntimeEncoder(nn.Module):
    """The encoder run by ONNX Runtime: forward passes only (no gradient flows through it)."""

    def __init__(self, path: str, threads: int = 1):
        super().__init__()
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name
        # no weights of its own; one empty parameter tells code that looks for the module's
        # device (torchattacks, the attack suite) that it is on the CPU
        self.device_marker = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).numpy()
        return torch.from_numpy(self.session.run([self.output], {self.input: array})[0])


def parity_error(module: nn.Module, reference: nn.Module, images: torch.Tensor) -> float:
    """max |module - reference| over the embeddings of images, relative to the largest
    |reference output| (at least 1)."""
    with torch.no_grad():
        ours, theirs = module(images).float(), reference(images).float()
    if ours.shape != theirs.shape:
        return float("inf")
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1.0)).item()
