import pytest
import torch

from byorl.training.checkpoint import load_checkpoint, load_encoder, save_atomic
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
