import json
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from byorl.cli import app
from byorl.files import sha256_file
from byorl.model_dir import load_onnx_session, read_card
from byorl.training.checkpoint import load_encoder, load_torch_encoder
from byorl.training.config import TrainConfig
from byorl.training.data import load_images
from byorl.training.export import (
    PARITY_TOLERANCE,
    export_encoder,
    parity_error,
)
from byorl.training.models import create_model


def encoder_with_nontrivial_batchnorm(seed: int) -> torch.nn.Module:
    """A random preact_resnet_small whose BatchNorms are not the identity, so the ONNX graph's
    folded normalisations are really checked."""
    torch.manual_seed(seed)
    encoder = create_model("preact_resnet_small")
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return encoder.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, image_folder):
    """`byorl export` of a checkpoint in the training loop's format, with an evaluation."""
    tmp = tmp_path_factory.mktemp("export")
    encoder = encoder_with_nontrivial_batchnorm(0)
    config = TrainConfig()
    config.model.arch, config.model.width = "preact_resnet_small", 1
    config.data.source = str(image_folder)
    online = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    torch.save({"config": config.to_dict(), "online": online, "step": 7}, tmp / "checkpoint.pt")
    report = {"threat_model": {"norm": "linf", "eps": 8 / 255}, "mode": "quick",
              "data": "cifar10", "labels": {"count": 500}, "n_test": 1000,
              "heads": {"robust": {"evaluation": {"clean_accuracy": 0.5, "robust_accuracy": 0.25,
                                                  "attacks": []}}}}
    (tmp / "evaluation.json").write_text(json.dumps(report))
    result = CliRunner().invoke(app, ["export", str(tmp), "--out", str(tmp / "model"),
                                      "--metrics", str(tmp / "evaluation.json")])
    assert result.exit_code == 0, result.output
    # One tqdm bar over the export's stages, with the time left.
    assert re.search(r"parity checked: 100%.* 5/5 \[\d\d:\d\d<\d\d:\d\d", result.stderr)
    return tmp / "model", encoder, config


def test_export_writes_a_model_directory_with_its_card(exported, image_folder):
    out, encoder, _ = exported
    card = read_card(out)
    sha = sha256_file(out / "encoder.onnx")
    assert card["onnx_sha256"] == sha
    assert card["model_id"] == f"preact_resnet_small-x1-linf-{sha[:8]}"
    assert (card["architecture"], card["width"], card["embedding_dim"]) == (
        "preact_resnet_small", 1, encoder.num_features)
    assert card["input_size"] == [3, 32, 32]
    assert card["threat_model"] == {"norm": "linf", "eps": 8 / 255, "attack": "apgd", "steps": 40}
    assert card["training"]["method"] == "byorl"
    assert card["training"]["data"] == [str(image_folder)]
    assert card["metrics"]["heads"] == {"robust": {"clean_accuracy": 0.5, "robust_accuracy": 0.25}}
    assert card["metrics"]["threat_model"]["norm"] == "linf"
    assert max(card["parity"]["max_abs_diff"].values()) < PARITY_TOLERANCE
    assert set(card["parity"]["max_abs_diff"]) == {"random", "real"}
    assert "export" in card["command"]


def test_onnx_runtime_matches_pytorch_with_a_dynamic_batch(exported, image_folder):
    out, encoder, _ = exported
    session = load_onnx_session(out, threads=1)
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == ("images", "embeddings")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]  # symbolic batch
    real = load_images(str(image_folder), "test", 32, cache_dir=None).images[:64].float() / 255
    random = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for images in (real, random):
        for n in (1, 5, 64):
            with torch.no_grad():
                ref = encoder(images[:n]).numpy()
            got = session.run(["embeddings"], {"images": images[:n].numpy()})[0]
            assert got.shape == (n, encoder.num_features)
            assert np.abs(got - ref).max() < 1e-4
    assert parity_error(encoder, session, real) < PARITY_TOLERANCE


def test_parity_error_sees_a_different_encoder(exported):
    out, _, _ = exported
    other = encoder_with_nontrivial_batchnorm(1)
    images = torch.rand(64, 3, 32, 32)
    assert parity_error(other, load_onnx_session(out, threads=1), images) > 100 * PARITY_TOLERANCE


def test_load_torch_encoder_restores_the_exported_weights(exported):
    out, encoder, _ = exported
    loaded = load_torch_encoder(out)
    assert not loaded.training
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), encoder(x))


def test_load_encoder_takes_an_exported_model_directory(exported):
    """`byorl evaluate` / `retrieval-demo` accept models/default-like directories too."""
    out, encoder, config = exported
    loaded, loaded_config = load_encoder(out)
    assert loaded_config == json.loads(json.dumps(config.to_dict())) and not loaded.training
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), encoder(x))


def test_export_needs_real_images_and_fails_before_writing(exported, tmp_path):
    checkpoint = exported[0].parent / "checkpoint.pt"
    with pytest.raises(ValueError, match="parity check needs real images"):
        export_encoder(checkpoint, tmp_path / "model", images=str(tmp_path / "missing"))
    assert not (tmp_path / "model").exists()
