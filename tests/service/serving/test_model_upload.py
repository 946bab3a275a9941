"""Validating an uploaded ONNX encoder before it is stored: its trial in a child process with
memory and time limits (each problem a 422 naming it), its card."""

import hashlib

import numpy as np
import pytest

from byorl.service.exceptions import Conflict, Invalid
from byorl.service.serving.model_upload import register_model, trial_in_child, user_card
from byorl.service.serving.served_models import ModelRegistry, user_models_root
from byorl.service.settings import Settings
from tests import hostile_models
from tests.conftest import flatten_onnx


def test_a_user_card_is_a_valid_model_card():
    card = user_card({"name": "mine", "input_size": 64}, "ab" * 32, 128)
    assert card["model_id"] == "mine-abababab" and card["input_size"] == [3, 64, 64]
    assert card["embedding_dim"] == 128 and card["onnx_sha256"] == "ab" * 32
    assert card["threat_model"] == {"norm": None, "eps": 0, "claimed": True}
    claimed = user_card({"name": "r", "input_size": 8, "threat_model": {"norm": "l2", "eps": 0.5}},
                        "0" * 64, 4)
    assert claimed["threat_model"] == {"norm": "l2", "eps": 0.5, "claimed": True}
    assert np.isfinite(card["created_at"])


def test_the_trial_runs_in_a_child_under_limits(tmp_path, monkeypatch):
    """The former trial ran in the api: a 256 MiB constant raised its peak RSS by 524 MB; a
    graph whose external data named a file of the api's working folder passed."""
    settings = Settings(data_dir=tmp_path)
    assert trial_in_child(flatten_onnx(), 8, settings) == 192
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.bin").write_bytes(np.ones(hostile_models.DIM, np.float32).tobytes())
    with pytest.raises(Invalid) as info:  # found by the old trial: here, in the child's folder
        trial_in_child(hostile_models.external_data("weights.bin"), 8, settings)
    assert info.value.code == "invalid_onnx"
    with pytest.raises(Invalid) as info:
        trial_in_child(hostile_models.big_constant(256 * 2**20), 8, settings)
    assert "MODEL_TRIAL_MEMORY_BYTES" in str(info.value)
    slow = Settings(data_dir=tmp_path, model_trial_timeout_s=0.05)
    with pytest.raises(Invalid) as info:
        trial_in_child(flatten_onnx(), 8, slow)
    assert info.value.code == "trial_timeout" and "MODEL_TRIAL_TIMEOUT_S" in str(info.value)


def test_the_registry_decides_an_upload_not_the_folder(model_dir, tmp_path):
    """Two uploads of one model (on two replicas) are decided by the model registry's key
    (tests/service/storage/test_model_store.py), not by the rename: a folder already in the
    model's place with no registered model (a crash's leftover) is replaced; a registered
    model is a 409, its files left as they were."""
    settings = Settings(model_dirs=[model_dir], data_dir=tmp_path, threads=1)
    registry = ModelRegistry(settings)
    data = flatten_onnx("LpNormalization", axis=1, p=2)
    model_id = user_card({"name": "m", "input_size": 8}, hashlib.sha256(data).hexdigest(),
                         192)["model_id"]
    leftover = user_models_root(settings) / model_id
    leftover.mkdir()
    (leftover / "encoder.onnx").write_bytes(b"half a model")
    model = register_model(data, {"name": "m", "input_size": 8}, settings, registry)
    assert model.model_dir == leftover and (leftover / "encoder.onnx").read_bytes() == data
    assert registry.store.get(model_id)["path"] == f"models/{model_id}"
    with pytest.raises(Conflict) as lost:
        register_model(data, {"name": "m", "input_size": 8}, settings, registry)
    assert lost.value.code == "model_exists"
    assert (leftover / "encoder.onnx").read_bytes() == data
    assert [p.name for p in user_models_root(settings).iterdir()
            if not p.name.startswith(".orphan")] == [model_id]
