"""The served models: which directories, found by id, loaded once each, user models after."""

import asyncio
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from sqlalchemy import update

from byorl.model_dir import read_card
from byorl.service.exceptions import NotFound
from byorl.service.serving.model_upload import register_model
from byorl.service.serving.served_models import (
    ModelRegistry,
    find_model_dir,
    model_store,
    user_models_root,
)
from byorl.service.settings import BUNDLED_MODELS, Settings
from byorl.service.storage.database import MODELS
from tests.conftest import ROOT, flatten_onnx

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
    """Bundled ones among MODEL_DIRS; users' through the model registry (as workers do), the
    file's sha256 checked against the registry's."""
    settings = Settings(model_dirs=[model_dir, SECOND], data_dir=tmp_path)
    assert find_model_dir(settings, read_card(SECOND)["model_id"]) == SECOND
    user = user_models_root(settings) / "mine-12345678"
    shutil.copytree(model_dir, user)  # a user model: the same layout under the data dir
    with pytest.raises(NotFound):  # on disk, but not registered
        find_model_dir(settings, "mine-12345678")
    store = model_store(settings)
    store.register({**read_card(model_dir), "model_id": "mine-12345678"}, "models/mine-12345678")
    assert find_model_dir(settings, "mine-12345678") == user
    (user / "encoder.onnx").write_bytes(b"other weights")
    with pytest.raises(RuntimeError, match="sha256"):
        find_model_dir(settings, "mine-12345678")
    store.delete("mine-12345678")
    for unknown in ("nope", "../models", "mine-12345678"):
        with pytest.raises(NotFound):
            find_model_dir(settings, unknown)


def test_the_registry_loads_bundled_then_user_models_and_refuses_twins(model_dir, tmp_path):
    root = user_models_root(Settings(data_dir=tmp_path))
    for name, created in (("late", 2.0), ("early", 1.0)):
        shutil.copytree(model_dir, root / name)
        card = {**read_card(model_dir), "model_id": name, "created_at": created}
        (root / name / "card.json").write_text(json.dumps(card))
    (root / ".creating-left-by-a-crash").mkdir()
    os.utime(root / ".creating-left-by-a-crash", (0, 0))  # old: not another replica's upload
    (root / ".creating-by-another-replica").mkdir()  # just begun: kept
    settings = Settings(model_dirs=[SECOND, model_dir], data_dir=tmp_path, threads=1)
    registry = ModelRegistry(settings)
    ids = [m.model_id for m in registry]
    assert ids == [read_card(SECOND)["model_id"], read_card(model_dir)["model_id"], "early",
                   "late"]
    assert registry.default.model_id == ids[0] and registry.get(None) is registry.default
    assert [m.bundled for m in registry] == [True, True, False, False]
    assert registry.user_count() == 2 and "early" in registry
    assert not (root / ".creating-left-by-a-crash").exists()
    assert (root / ".creating-by-another-replica").exists()
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


def test_two_processes_follow_one_registry(model_dir, tmp_path):
    """Two registries (two api processes) on one data directory and one database: a model
    registered through A is served by B on its first request (no new trial) and listed by B
    after a refresh; deleted through A, B drops it at its next refresh; a model whose folder
    was changed behind the registry's back is refused."""
    settings = Settings(model_dirs=[model_dir], data_dir=tmp_path, threads=1)
    a, b = ModelRegistry(settings), ModelRegistry(settings)
    data = flatten_onnx("LpNormalization", axis=1, p=2)
    model = a.add(register_model(data, {"name": "flat", "input_size": 8}, settings, a))
    model_id = model.model_id
    assert model.model_dir == user_models_root(settings) / model_id
    assert [m.model_id for m in b][1:] == []  # not listed by B yet
    assert b.get(model_id).card == model.card and model_id in b  # found on B's first ask
    b.unavailable.clear()

    async def steps():
        pixels = np.full((2, 3, 8, 8), 7, np.uint8)
        np.testing.assert_allclose(await b.get(model_id).embed(pixels),
                                   await model.embed(pixels), atol=1e-6)
        await a.remove(model_id)
        assert model_id not in [m.model_id for m in a]
        served_by_b = b.get(model_id)
        await b.refresh()
        assert [m.model_id for m in b][1:] == [] and model_id not in b
        with pytest.raises(NotFound):
            await served_by_b.embed(pixels)  # a request that held it: 404, not a hang
        await a.stop()
        await b.stop()

    asyncio.run(steps())
    c = ModelRegistry(settings)
    second = c.add(register_model(data, {"name": "again", "input_size": 8}, settings, c))
    folder, model_id = second.model_dir, second.model_id

    def store_files(onnx: bytes) -> dict:
        """Other weights in the model's folder, with a card that matches them."""
        folder.mkdir(exist_ok=True)
        (folder / "encoder.onnx").write_bytes(onnx)
        card = {**second.card, "onnx_sha256": hashlib.sha256(onnx).hexdigest()}
        (folder / "card.json").write_text(json.dumps(card))
        return card

    async def replaced():
        """Another file registered under a served id (which the registry refuses since: a
        defence in depth): the next refresh serves the new file."""
        d = ModelRegistry(settings)
        assert d.get(model_id).card["onnx_sha256"] == second.card["onnx_sha256"]
        card = store_files(flatten_onnx("LpNormalization", axis=1, p=1))
        with c.store.db.transaction() as conn:  # (the API refuses another file under an id)
            conn.execute(update(MODELS).where(MODELS.c.id == model_id).values(
                card=json.dumps(card), onnx_sha256=card["onnx_sha256"]))
        await d.refresh()
        assert d.get(model_id).card["onnx_sha256"] == card["onnx_sha256"]
        await d.stop()
        await c.stop()

    asyncio.run(replaced())
    store_files(flatten_onnx())  # changed behind the registry's back
    d = ModelRegistry(settings)
    assert model_id not in d
    assert "is not the registry's" in d.unavailable[model_id]["error"]
    with pytest.raises(RuntimeError, match="model registry"):  # what a worker finds
        find_model_dir(settings, model_id)
