import shutil

import numpy as np
import pytest
import torch

from byorl.model_dir import ModelCardError, embed, load_onnx_session
from byorl.training.checkpoint import (
    load_checkpoint,
    load_encoder,
    load_torch_encoder,
    save_atomic,
)
from byorl.training.config import TrainConfig
from byorl.training.models import create_model


def test_save_atomic_round_trips_and_leaves_no_temporary(tmp_path):
    save_atomic({"step": 1, "w": torch.arange(3)}, tmp_path / "checkpoint.pt")
    save_atomic({"step": 2, "w": torch.arange(4)}, tmp_path / "checkpoint.pt")
    ckpt = load_checkpoint(tmp_path)  # a run directory: its checkpoint.pt
    assert ckpt["step"] == 2 and ckpt["w"].tolist() == [0, 1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "elsewhere")


def test_load_encoder_takes_the_online_encoder_of_a_run(tmp_path):
    torch.manual_seed(0)
    encoder = create_model("preact_resnet_small")
    config = TrainConfig().to_dict()
    config["model"] |= {"arch": "preact_resnet_small", "width": 1}
    online = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    online["projector.0.weight"] = torch.zeros(1)  # the rest of the online network: ignored
    save_atomic({"config": config, "online": online, "step": 3}, tmp_path / "checkpoint.pt")
    loaded, loaded_config = load_encoder(tmp_path)
    assert loaded_config == config and not loaded.training
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), encoder.eval()(x))


def test_load_torch_encoder_gives_what_the_onnx_session_gives(model_dir, tmp_path):
    """The directory's two forms of one encoder: workers attack the torch one, the API serves
    the ONNX one."""
    encoder = load_torch_encoder(model_dir)
    assert not encoder.training
    x = np.random.default_rng(0).random((8, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        ref = encoder(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(embed(load_onnx_session(model_dir, threads=1), x), ref, atol=1e-4)
    shutil.copytree(model_dir, tmp_path / "m")
    (tmp_path / "m" / "card.json").unlink()  # an unfinished export
    with pytest.raises(ModelCardError, match="has no card.json"):
        load_torch_encoder(tmp_path / "m")
