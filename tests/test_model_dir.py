import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from byorl.model_dir import (
    ModelCardError,
    embed,
    load_onnx_session,
    read_card,
    validate_card,
)
from byorl.training.data import decode_image
from byorl.training.knn import RULE

ROOT = Path(__file__).resolve().parents[1]


def test_read_card_validates_fields_and_types(model_dir, tmp_path):
    card = read_card(model_dir)
    assert card["embedding_dim"] == 256 and card["input_size"] == [3, 32, 32]
    broken = {k: v for k, v in card.items() if k != "onnx_sha256"} | {"width": "1"}
    with pytest.raises(ModelCardError, match="missing 'onnx_sha256'.*'width' should be int"):
        validate_card(broken)
    with pytest.raises(ModelCardError, match=r"input_size should be \[3, H, W\]"):
        validate_card(card | {"input_size": [32, 32]})
    with pytest.raises(ModelCardError, match="threat_model.eps"):
        validate_card(card | {"threat_model": {"norm": "linf", "eps": -1}})
    with pytest.raises(ModelCardError, match="no card.json"):
        read_card(tmp_path)
    (tmp_path / "card.json").write_text("{not json")
    with pytest.raises(ModelCardError, match="not valid JSON"):
        read_card(tmp_path)


def test_session_uses_explicit_threads_and_the_available_provider(model_dir):
    session = load_onnx_session(model_dir, threads=1)
    assert session.get_session_options().intra_op_num_threads == 1
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert session.get_providers()[0] == ("CUDAExecutionProvider" if cuda else
                                          "CPUExecutionProvider")
    assert load_onnx_session(model_dir, device="cpu").get_providers() == ["CPUExecutionProvider"]
    if not cuda:
        with pytest.raises(ModelCardError, match="onnxruntime-gpu"):
            load_onnx_session(model_dir, device="cuda")


def test_session_refuses_an_onnx_file_other_than_the_cards(model_dir, tmp_path):
    copy = shutil.copytree(model_dir, tmp_path / "model")
    card = json.loads((copy / "card.json").read_text())
    (copy / "card.json").write_text(json.dumps(card | {"onnx_sha256": "0" * 64}))
    with pytest.raises(ModelCardError, match="does not match the sha256"):
        load_onnx_session(copy)


def test_embed_takes_uint8_or_float_and_any_batch_size(model_dir):
    session = load_onnx_session(model_dir, threads=1)
    images = np.random.default_rng(0).integers(0, 256, (10, 3, 32, 32), dtype=np.uint8)
    whole = embed(session, images, batch_size=64)
    assert whole.shape == (10, 256) and whole.dtype == np.float32
    np.testing.assert_allclose(embed(session, images, batch_size=3), whole, atol=1e-5)
    np.testing.assert_allclose(embed(session, images.astype(np.float64) / 255), whole, atol=1e-5)
    assert embed(session, images[:0]).shape == (0, 256)


@pytest.mark.parametrize("name", ["default", "byol-reference"])
def test_bundled_models_load_embed_and_carry_their_measured_metrics(name, image_folder):
    """The encoders shipped in models/ (the service's default and its BYOL reference, both from
    the 17-epoch runs of results/cpu-default-v2/): valid card, ONNX under 20 MB that loads
    (sha256 checked) and embeds, and the card's metrics are the collected full-suite evaluations
    on 1000 test images, every sanity check passed, robust <= clean; plus the encoder's own
    k-NN accuracy (2000 test queries against the 50,000 training images)."""
    model_dir = ROOT / "models" / name
    card = read_card(model_dir)
    assert (model_dir / "encoder.onnx").stat().st_size < 20 * 2**20
    images = np.stack([decode_image(p.read_bytes(), 32)
                       for p in sorted(f for f in image_folder.rglob("*") if f.is_file())[:4]])
    out = embed(load_onnx_session(model_dir, threads=1), images)
    assert out.shape == (4, card["embedding_dim"]) and np.isfinite(out).all()

    collected = json.loads((ROOT / "results" / "cpu-default-v2" / "metrics.json").read_text())
    metrics = dict(card["metrics"])
    knn = metrics.pop("knn")  # this encoder's own, put on its card by `byorl knn --card`
    assert metrics == collected
    assert knn["onnx_sha256"] == card["onnx_sha256"] and knn["rule"] == RULE
    assert (knn["n_queries"], knn["n_gallery"], knn["metric"]) == (2000, 50000, "cosine")
    assert knn["command"].startswith(f"byorl knn models/{name} ")
    model = "byorl" if name == "default" else "byol"
    assert (card["threat_model"]["attack"] == "pgd") == (model == "byorl")
    for evaluation in collected[model]["evaluations"].values():
        assert evaluation["n_test"] == 1000 and evaluation["threat_model"]["norm"] == "linf"
        assert evaluation["mode"] == "full"
        for head in ("nonrobust", "l2", "robust"):
            h = evaluation["heads"][head]
            assert h["checks_passed"] and 0 <= h["robust_accuracy"] <= h["clean_accuracy"]
