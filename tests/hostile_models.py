"""Hand-built hostile ONNX encoders (input x: (N, 3, 8, 8) float), each a defect found by
probing the service: for the tests and `bench/bench_hostile.py`."""

import numpy as np
from onnx import TensorProto, helper

SIDE = 8
DIM = 3 * SIDE * SIDE


def encoder(nodes, initializers=()) -> bytes:
    """A graph from x (N, 3, 8, 8) to y (N, DIM) through `nodes` (their input "f" is x
    flattened)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIDE, SIDE])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", DIM])
    flatten = helper.make_node("Flatten", ["x"], ["f"], axis=1)
    graph = helper.make_graph([flatten, *nodes], "hostile", [x], [y], list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]
                             ).SerializeToString()


def const(name: str, values, dtype=TensorProto.INT64, dims=None):
    values = list(np.ravel(values))
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(
        name, dtype, [len(values)] if dims is None else dims, values))


def batch_of_two_only() -> bytes:
    """Flatten then Reshape to [2, -1]: right at a batch of 2, wrong at every other size."""
    return encoder([const("s", [2, -1]), helper.make_node("Reshape", ["f", "s"], ["y"])])


def external_data(location: str) -> bytes:
    """Adds an initializer whose DIM floats lie in the file `location` (not in the upload)."""
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[DIM],
                    data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", str(4 * DIM))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    return encoder([helper.make_node("Add", ["f", "w"], ["y"])], [w])


def big_constant(nbytes: int) -> bytes:
    """Adds the sum of a ConstantOfShape of `nbytes` bytes of ones (allocated at every run,
    or when the session folds constants)."""
    value = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    return encoder([const("n", [nbytes // 4]),
                    helper.make_node("ConstantOfShape", ["n"], ["c"], value=value),
                    helper.make_node("ReduceSum", ["c"], ["s"], keepdims=1),
                    helper.make_node("Mul", ["s", "z"], ["t"]),
                    const("z", [0.0], TensorProto.FLOAT),
                    helper.make_node("Add", ["f", "t"], ["y"])])


def infinite_on_white() -> bytes:
    """1 / (1 - pixel): finite on random trial pixels in [0, 1), infinite for a white image."""
    return encoder([const("one", [1.0], TensorProto.FLOAT),
                    helper.make_node("Sub", ["one", "f"], ["d"]),
                    helper.make_node("Reciprocal", ["d"], ["y"])])
