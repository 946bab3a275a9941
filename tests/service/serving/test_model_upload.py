"""Validating an uploaded ONNX encoder: each problem a 422 naming it."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from byorl.service.exceptions import Invalid
from byorl.service.serving.model_upload import check_signature, open_session, trial_run, user_card
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
    assert "[2, 3, 8, 8]" in refused("invalid_output", trial_run, open_session(image), 8, 4096)
    nan = graph([x()], [helper.make_node("Flatten", ["x"], ["f"]),
                        helper.make_node("Constant", [], ["m"], value=helper.make_tensor(
                            "m", TensorProto.FLOAT, [], [-1.0])),
                        helper.make_node("Mul", ["f", "m"], ["n"]),
                        helper.make_node("Sqrt", ["n"], ["y"])], ["N", 192])
    assert "NaN" in refused("invalid_output", trial_run, open_session(nan), 8, 4096)
    wrong_side = open_session(flatten_onnx(side=8))
    assert "3x16x16" in refused("onnx_run_failed", trial_run, wrong_side, 16, 4096)
    assert "cannot load" in refused("invalid_onnx", open_session, b"\x08\x01garbage")


def test_a_user_card_is_a_valid_model_card():
    card = user_card({"name": "mine", "input_size": 64}, "ab" * 32, 128)
    assert card["model_id"] == "mine-abababab" and card["input_size"] == [3, 64, 64]
    assert card["embedding_dim"] == 128 and card["onnx_sha256"] == "ab" * 32
    assert card["threat_model"] == {"norm": None, "eps": 0, "claimed": True}
    claimed = user_card({"name": "r", "input_size": 8, "threat_model": {"norm": "l2", "eps": 0.5}},
                        "0" * 64, 4)
    assert claimed["threat_model"] == {"norm": "l2", "eps": 0.5, "claimed": True}
    assert np.isfinite(card["created_at"])
