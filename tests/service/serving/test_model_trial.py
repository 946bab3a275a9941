"""The trial of an uploaded ONNX encoder (in its child process): each problem a 422 naming it."""

import json
import subprocess

import numpy as np
import pytest
from onnx import TensorProto, helper

from byorl.service.exceptions import Invalid
from byorl.service.serving.model_trial import check_signature, open_session, trial_run
from byorl.service.serving.model_upload import TRIAL
from tests import hostile_models
from tests.conftest import flatten_onnx


def graph(inputs, nodes, output_shape, opset=17) -> bytes:
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, [y]),
                              opset_imports=[helper.make_opsetid("", opset)])
    return model.SerializeToString()


def x(name="x", dtype=TensorProto.FLOAT, shape=("N", 3, 8, 8)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def refused(code, fn, *args):
    with pytest.raises(Invalid) as info:
        fn(*args)
    assert info.value.code == code, info.value
    return str(info.value)


def test_signatures_that_are_refused():
    two = graph([x("a"), x("b")], [helper.make_node("Add", ["a", "b"], ["s"]),
                                   helper.make_node("Flatten", ["s"], ["y"])], ["N", 192])
    assert "2 inputs" in refused("invalid_signature", check_signature, open_session(two), 8)
    ints = graph([x(dtype=TensorProto.INT64)], [helper.make_node("Flatten", ["x"], ["f"]),
                                                 helper.make_node("Cast", ["f"], ["y"], to=1)],
                 ["N", 192])
    assert "tensor(int64)" in refused("invalid_signature", check_signature, open_session(ints), 8)
    grey = graph([x(shape=("N", 1, 8, 8))], [helper.make_node("Flatten", ["x"], ["y"])],
                 ["N", 64])
    assert "1 channels" in refused("invalid_signature", check_signature, open_session(grey), 8)
    fixed = open_session(flatten_onnx(batch=1))
    assert "fixed batch size 1" in refused("invalid_signature", check_signature, fixed, 8)
    check_signature(open_session(flatten_onnx()), 8)  # accepted


def test_the_trial_run_checks_one_finite_vector_per_image():
    session = open_session(flatten_onnx())
    assert trial_run(session, 8, 192) == 192
    assert "MAX_MODEL_DIM = 100" in refused("invalid_output", trial_run, session, 8, 100)
    image = graph([x()], [helper.make_node("Identity", ["x"], ["y"])], ["N", 3, 8, 8])
    assert "[1, 3, 8, 8]" in refused("invalid_output", trial_run, open_session(image), 8, 4096)
    nan = graph([x()], [helper.make_node("Flatten", ["x"], ["f"]),
                        helper.make_node("Constant", [], ["m"], value=helper.make_tensor(
                            "m", TensorProto.FLOAT, [], [-1.0])),
                        helper.make_node("Mul", ["f", "m"], ["n"]),
                        helper.make_node("Sqrt", ["n"], ["y"])], ["N", 192])
    assert "NaN" in refused("invalid_output", trial_run, open_session(nan), 8, 4096)
    wrong_side = open_session(flatten_onnx(side=8))
    assert "3x16x16" in refused("onnx_run_failed", trial_run, wrong_side, 16, 4096)
    assert "cannot load" in refused("invalid_onnx", open_session, b"\x08\x01garbage")


def test_a_graph_right_at_a_batch_of_two_only_is_refused():
    session = open_session(hostile_models.batch_of_two_only())
    assert np.asarray(session.run(None, {"x": np.zeros((2, 3, 8, 8), np.float32)})[0]).shape \
        == (2, 192)  # what the former trial (a batch of 2) saw
    message = refused("invalid_output", trial_run, session, 8, 4096)
    assert "[2, 96] for 1 images" in message


def child(data: bytes, memory: int, cwd) -> dict:
    argv = [*TRIAL, "8", "4096", str(memory)]
    done = subprocess.run(argv, input=data, capture_output=True, timeout=120, cwd=cwd,
                          check=True)
    return json.loads(done.stdout)


def test_the_child_answers_in_json_within_its_memory_limit(tmp_path):
    assert child(flatten_onnx(), 512 * 2**20, tmp_path) == {"dim": 192}
    big = child(hostile_models.big_constant(256 * 2**20), 128 * 2**20, tmp_path)
    assert big["code"] in ("invalid_onnx", "onnx_run_failed")  # folded at opening, or run
    assert "MODEL_TRIAL_MEMORY_BYTES" in big["message"]
    assert child(hostile_models.big_constant(256 * 2**20), 2**30, tmp_path) == {"dim": 192}
