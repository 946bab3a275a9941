import numpy as np
import pytest
from typer.testing import CliRunner

from byorl.cli import app
from byorl.index.build import build_index
from byorl.index.faiss_index import EmbeddingIndex
from byorl.model_dir import embed, load_onnx_session, read_card
from byorl.training.data import load_images


def test_index_build_command_indexes_every_image_under_its_model(model_dir, image_folder, tmp_path):
    out = tmp_path / "gallery.bin"
    result = CliRunner().invoke(app, ["index", "build", "--model", str(model_dir), "--images",
                                      str(image_folder), "--out", str(out), "--split", "test",
                                      "--threads", "1"])
    assert result.exit_code == 0, result.output
    data = load_images(str(image_folder), "test", 32, cache_dir=None)
    index = EmbeddingIndex.load(out, model_id=read_card(model_dir)["model_id"])
    assert len(index) == len(data) and index.dim == 256
    # each image's own embedding finds that image first, with its class as metadata
    queries = embed(load_onnx_session(model_dir, threads=1), data.images.numpy())
    for i, hits in enumerate(index.search(queries, 3)):
        assert hits[0].key == f"test/{i}"
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[0].metadata == {"class": data.classes[data.labels[i]]}


def test_build_index_refuses_images_of_another_size(model_dir):
    images = np.zeros((2, 3, 64, 64), np.uint8)
    with pytest.raises(ValueError, match=r"\(3, 64, 64\).*takes \(3, 32, 32\)"):
        build_index(model_dir, images, ["a", "b"])
