"""k-NN accuracy: the vote and the search on hand-made embeddings whose answer is known,
against a brute-force numpy reference, and through an exported model on the shipped sample."""

import json
import shutil
from collections import Counter

import numpy as np
import pytest
from typer.testing import CliRunner

from byorl.cli import app
from byorl.model_dir import ModelCardError, embed, load_onnx_session, read_card, validate_card
from byorl.training.data import load_images
from byorl.training.knn import RULE, knn_accuracy, model_knn, nearest_labels, vote, write_to_card


def unit(degrees: list[float]) -> np.ndarray:
    """Points on the unit circle at these angles: their cosines are cos(difference)."""
    rad = np.radians(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], 1).astype(np.float32)


def test_vote_is_the_majority_and_a_tie_goes_to_the_label_seen_first():
    labels = np.array([[2, 0, 0, 3, 4], [1, 0, 0, 1, 4], [0, 1, 1, 0, 2], [3, 3, 1, 1, 1],
                       [4, 2, 2, 4, 3]])
    assert vote(labels).tolist() == [0, 1, 0, 1, 4]
    assert vote(labels[:, :1]).tolist() == [2, 1, 0, 3, 4]  # k=1: the nearest item's label


def test_closed_form_neighbours_ties_and_k_beyond_a_class():
    # query at 1 degree; gallery at 0 (class 0), 10, 20 (class 1), 180 (class 0)
    gallery, gallery_labels = unit([0, 10, 20, 180]), np.array([0, 1, 1, 0])
    query, label = unit([1]), np.array([0])
    assert nearest_labels(query, gallery, gallery_labels, 4).tolist() == [[0, 1, 1, 0]]
    acc = knn_accuracy(query, label, gallery, gallery_labels, ks=(1, 2, 3, 4, 20))
    # 1: nearest is class 0; 2: tie 0/1 -> the nearest's class 0; 3: two of class 1;
    # 4: tie 2/2 -> class 0; 20 > gallery size: the same four
    assert acc == {1: 1.0, 2: 1.0, 3: 0.0, 4: 1.0, 20: 1.0}
    # cosine: scaling gallery rows or queries changes nothing
    scaled = gallery * np.array([[5.0], [0.1], [2.0], [30.0]], np.float32)
    assert knn_accuracy(query * 7, label, scaled, gallery_labels, ks=(1, 2, 3, 4)) == \
        {1: 1.0, 2: 1.0, 3: 0.0, 4: 1.0}


def test_k_larger_than_the_right_class_outvotes_its_nearest_members():
    # class 0 has two members nearest the query, class 1 five farther ones
    gallery = unit([0, 2, 30, 35, 40, 45, 50])
    gallery_labels = np.array([0, 0, 1, 1, 1, 1, 1])
    queries, labels = unit([1, 44]), np.array([0, 1])
    assert knn_accuracy(queries, labels, gallery, gallery_labels, ks=(1, 3, 5)) == \
        {1: 1.0, 3: 1.0, 5: 0.5}


def reference_accuracy(queries, labels, gallery, gallery_labels, k):
    """The rule written out plainly: full cosine matrix, sort, count, first tied label wins."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    order = np.argsort(-(q.astype(np.float64) @ g.T.astype(np.float64)), axis=1, kind="stable")
    right = 0
    for row, y in zip(gallery_labels[order[:, :k]], labels, strict=True):
        counts = Counter(row.tolist())
        top = max(counts.values())
        right += next(c for c in row.tolist() if counts[c] == top) == y
    return right / len(labels)


def test_matches_a_brute_force_reference_on_random_data():
    rng = np.random.default_rng(0)
    gallery, queries = rng.normal(size=(1000, 16)), rng.normal(size=(300, 16))
    gallery_labels, labels = rng.integers(0, 5, 1000), rng.integers(0, 5, 300)
    gallery[:, 0] += 2 * gallery_labels  # classes that neighbours can tell apart, partly
    queries[:, 0] += 2 * labels
    ks = (1, 5, 20)
    got = knn_accuracy(queries, labels, gallery, gallery_labels, ks)
    assert got == {k: reference_accuracy(queries, labels, gallery, gallery_labels, k)
                   for k in ks}
    assert 0.3 < got[1] < 1  # neither chance (0.2) nor trivial
    # query batches change nothing
    np.testing.assert_array_equal(nearest_labels(queries, gallery, gallery_labels, 20, 7),
                                  nearest_labels(queries, gallery, gallery_labels, 20))


@pytest.fixture(scope="module")
def split_folder(image_folder, tmp_path_factory):
    """The 12 images per class of `image_folder` as train/ (the first 8) and test/ (4)."""
    out = tmp_path_factory.mktemp("split")
    for cls in sorted(image_folder.iterdir()):
        for i, f in enumerate(sorted(cls.iterdir())):
            dest = out / ("train" if i < 8 else "test") / cls.name
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest / f.name)
    return out


def test_model_knn_embeds_the_splits_through_onnx_runtime(model_dir, split_folder):
    result = model_knn(model_dir, str(split_folder), queries=0, threads=1, cache_dir=None)
    session = load_onnx_session(model_dir, threads=1)
    train, test = (load_images(str(split_folder), s, cache_dir=None) for s in ("train", "test"))
    expected = {f"k{k}": round(reference_accuracy(
        embed(session, test.images.numpy()), test.labels.numpy(),
        embed(session, train.images.numpy()), train.labels.numpy(), k), 6) for k in (1, 20)}
    card = read_card(model_dir)
    assert result == {**expected, "n_queries": 40, "n_gallery": 80, "metric": "cosine",
                      "rule": RULE, "data": str(split_folder), "seed": 0,
                      "model_id": card["model_id"], "onnx_sha256": card["onnx_sha256"]}
    drawn = model_knn(model_dir, str(split_folder), queries=10, threads=1, cache_dir=None)
    assert drawn["n_queries"] == 10 and drawn["n_gallery"] == 80


def test_every_query_is_its_own_nearest_neighbour_when_the_gallery_holds_it(model_dir,
                                                                             image_folder):
    # a folder without train/test splits serves all its images as either split
    result = model_knn(model_dir, str(image_folder), queries=0, threads=1, cache_dir=None)
    assert result["k1"] == 1.0 and result["n_queries"] == result["n_gallery"] == 120


def test_knn_command_prints_writes_and_puts_the_result_on_the_card(model_dir, split_folder,
                                                                   tmp_path):
    model = shutil.copytree(model_dir, tmp_path / "model")
    out = tmp_path / "knn.json"
    run = CliRunner().invoke(app, ["knn", str(model), "--data", str(split_folder), "--queries",
                                  "0", "--threads", "1", "--out", str(out), "--card"])
    assert run.exit_code == 0, run.output
    result = json.loads(out.read_text())
    assert json.loads(run.stdout) == result
    assert result["command"] == f"byorl knn {model} --data {split_folder} --queries 0 " \
                                "--seed 0 --card"
    card = read_card(model)
    assert card["metrics"]["knn"] == result
    load_onnx_session(model, threads=1)  # the ONNX file still matches the card
    with pytest.raises(ValueError, match="measured on other"):
        write_to_card(model, result | {"onnx_sha256": "0" * 64, "model_id": "other"})


def test_card_validation_checks_knn_only_when_present(model_dir):
    card = read_card(model_dir)
    assert "knn" not in card["metrics"]  # cards without one stay valid
    good = {"k1": 0.5, "k20": 0.25, "rule": RULE}
    validate_card(card | {"metrics": {"knn": good}})
    with pytest.raises(ModelCardError, match=r"metrics.knn.k1 should be a number in \[0, 1\]"):
        validate_card(card | {"metrics": {"knn": good | {"k1": 1.5}}})
    with pytest.raises(ModelCardError, match="metrics.knn.rule"):
        validate_card(card | {"metrics": {"knn": {"k1": 0.5, "k20": 0.5}}})
