"""Readiness that means ready: /readyz embeds one image per served model, so a model whose
inference broke takes the service out of rotation while liveness stays cheap and green."""

import onnxruntime as ort
from fastapi.testclient import TestClient
from onnx import TensorProto, helper

from byorl.model_dir import INPUT_NAME, OUTPUT_NAME
from byorl.service.main import create_app


def nan_session() -> ort.InferenceSession:
    """A real ONNX Runtime session whose every output is NaN (log of negative pixels)."""
    x = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, 32, 32])
    y = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 3072])
    nodes = [helper.make_node("Neg", [INPUT_NAME], ["n"]),
             helper.make_node("Sub", ["n", "one"], ["m"]),  # -x - 1 < 0 for every pixel
             helper.make_node("Log", ["m"], ["l"]),
             helper.make_node("Flatten", ["l"], [OUTPUT_NAME])]
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    graph = helper.make_graph(nodes, "nan", [x], [y], initializer=[one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_a_model_whose_inference_broke_makes_the_service_not_ready(settings):
    with TestClient(create_app(settings.model_copy(update={"ready_probe_s": 0}))) as c:
        ready = c.get("/readyz").json()
        model_id = c.get("/models").json()[0]["model_id"]
        assert ready["status"] == "ready" and ready["checks"][f"inference:{model_id}"]
        encoder = c.app.state.byorl.models.default
        encoder.session = encoder.latency_session = nan_session()  # its inference breaks
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"][f"inference:{model_id}"] is False
        assert c.get("/healthz").status_code == 200  # alive: restart is not the cure


def test_the_probe_is_cached_between_readiness_checks(settings):
    with TestClient(create_app(settings.model_copy(update={"ready_probe_s": 3600}))) as c:
        assert c.get("/readyz").status_code == 200
        batches = 'byorl_batch_images_count'
        before = next(line for line in c.get("/metrics").text.splitlines()
                      if line.startswith(batches))
        for _ in range(5):
            assert c.get("/readyz").status_code == 200
        after = next(line for line in c.get("/metrics").text.splitlines()
                     if line.startswith(batches))
        assert after == before  # no model call: the first probe's answer is reused
