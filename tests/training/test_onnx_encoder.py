"""ONNX encoders from outside the project as PyTorch modules: converted (white-box) or run by
ONNX Runtime (black-box)."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from byorl.training.onnx_encoder import PARITY_TOLERANCE, OnnxRuntimeEncoder, convert, parity_error
from tests.conftest import flatten_onnx


def test_a_torchvision_export_converts_with_parity_and_gradients(user_onnx):
    """PyTorch's default exporter writes opset 20 and Reshape(allowzero=1), which onnx2torch
    cannot read as such: the conversion matches ONNX Runtime and gives input gradients."""
    converted, runtime = convert(str(user_onnx)), OnnxRuntimeEncoder(str(user_onnx))
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert parity_error(converted, runtime, x) <= PARITY_TOLERANCE
    session = ort.InferenceSession(str(user_onnx))
    reference = session.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(runtime(x).numpy(), reference, rtol=0, atol=0)
    x.requires_grad_(True)
    converted(x).pow(2).sum().backward()
    assert x.grad.abs().sum() > 0


def test_runtime_encoder_has_no_gradients_and_sits_on_the_cpu(user_onnx):
    runtime = OnnxRuntimeEncoder(str(user_onnx))
    assert next(runtime.parameters()).device.type == "cpu"
    out = runtime(torch.rand(2, 3, 32, 32, requires_grad=True))
    assert out.shape == (2, 64) and not out.requires_grad


def test_an_op_onnx2torch_lacks_fails_the_conversion(tmp_path):
    path = tmp_path / "l2.onnx"
    path.write_bytes(flatten_onnx("LpNormalization", axis=1, p=2))
    with pytest.raises(NotImplementedError, match="LpNormalization"):
        convert(str(path))
    out = OnnxRuntimeEncoder(str(path))(torch.rand(3, 3, 8, 8))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))  # what the graph computes


def test_parity_error_is_relative_to_the_largest_output():
    double = torch.nn.Linear(1, 1, bias=False)
    double.weight.data.fill_(2.0)
    x = torch.tensor([[1.0], [4.0]])
    # |2x - x| max 4, over max |x| = 4
    assert parity_error(double, torch.nn.Identity(), x) == pytest.approx(1.0)
    assert parity_error(torch.nn.Identity(), torch.nn.Identity(), x) == 0.0
