"""The served models: which directories, found by id, loaded once each, user models after."""

import json
import shutil

import pytest

from byorl.model_dir import read_card
from byorl.service.exceptions import NotFound
from byorl.service.serving.served_models import ModelRegistry, find_model_dir, user_models_root
from byorl.service.settings import BUNDLED_MODELS, Settings
from tests.conftest import ROOT

SECOND = ROOT / "models" / "byol-reference"


def test_which_directories_are_served(monkeypatch, model_dir):
    monkeypatch.delenv("BYORL_MODEL_DIR", raising=False)
    monkeypatch.delenv("BYORL_MODEL_DIRS", raising=False)
    assert Settings().served_model_dirs == list(BUNDLED_MODELS)
    assert Settings(model_dir=model_dir).served_model_dirs == [model_dir]  # the former setting
    monkeypatch.setenv("BYORL_MODEL_DIRS", f" {model_dir}, {SECOND},")
    assert Settings().served_model_dirs == [model_dir, SECOND]
    monkeypatch.delenv("BYORL_MODEL_DIRS")
    monkeypatch.setenv("BYORL_MODEL_DIR", str(SECOND))
    assert Settings().served_model_dirs == [SECOND]


def test_a_model_directory_is_found_by_its_id(model_dir, tmp_path):
    settings = Settings(model_dirs=[model_dir, SECOND], data_dir=tmp_path)
    assert find_model_dir(settings, read_card(SECOND)["model_id"]) == SECOND
    user = user_models_root(settings) / "mine-12345678"
    shutil.copytree(model_dir, user)  # a user model: the same layout under the data dir
    assert find_model_dir(settings, "mine-12345678") == user
    for unknown in ("nope", "../models"):
        with pytest.raises(NotFound):
            find_model_dir(settings, unknown)


def test_the_registry_loads_bundled_then_user_models_and_refuses_twins(model_dir, tmp_path):
    root = user_models_root(Settings(data_dir=tmp_path))
    for name, created in (("late", 2.0), ("early", 1.0)):
        shutil.copytree(model_dir, root / name)
        card = {**read_card(model_dir), "model_id": name, "created_at": created}
        (root / name / "card.json").write_text(json.dumps(card))
    (root / ".creating-left-by-a-crash").mkdir()
    settings = Settings(model_dirs=[SECOND, model_dir], data_dir=tmp_path, threads=1)
    registry = ModelRegistry(settings)
    ids = [m.model_id for m in registry]
    assert ids == [read_card(SECOND)["model_id"], read_card(model_dir)["model_id"], "early",
                   "late"]
    assert registry.default.model_id == ids[0] and registry.get(None) is registry.default
    assert [m.bundled for m in registry] == [True, True, False, False]
    assert registry.user_count() == 2 and "early" in registry
    assert not (root / ".creating-left-by-a-crash").exists()
    with pytest.raises(NotFound):
        registry.get("nope")
    with pytest.raises(RuntimeError, match="served twice"):
        ModelRegistry(Settings(model_dirs=[model_dir, model_dir], data_dir=tmp_path / "b"))


def store_user_model(root, name: str, model_dir, onnx: bytes | None = None) -> None:
    """A user model directory as an upload leaves it (the bundled card, renamed), optionally
    with other ONNX bytes (its card's sha256 kept: tampered)."""
    shutil.copytree(model_dir, root / name)
    (root / name / "card.json").write_text(json.dumps({**read_card(model_dir), "model_id": name}))
    if onnx is not None:
        (root / name / "encoder.onnx").write_bytes(onnx)


def test_a_user_model_that_fails_to_load_is_skipped_and_listed(model_dir, tmp_path, caplog):
    """It used to stop every start (a tampered file, or a graph right at one batch size)."""
    root = user_models_root(Settings(data_dir=tmp_path))
    store_user_model(root, "tampered", model_dir, (model_dir / "encoder.onnx").read_bytes()
                     + b"\0")
    store_user_model(root, "good", model_dir)
    registry = ModelRegistry(Settings(model_dirs=[model_dir], data_dir=tmp_path, threads=1))
    assert [m.model_id for m in registry][1:] == ["good"]
    bad = registry.unavailable["tampered"]
    assert bad["available"] is False and "sha256" in bad["error"]
    assert "user model tampered is unavailable" in caplog.text
    assert registry.user_count() == 2  # it still counts against MAX_USER_MODELS
