"""The Fig. 1 attack on an undefended (randomly initialised) encoder over real images."""

import json

import numpy as np
import pytest
import torch

from byorl.training.attacks import ThreatModel
from byorl.training.config import TrainConfig
from byorl.training.data import load_images
from byorl.training.linear_classifier import to_float
from byorl.training.models import create_model
from byorl.training.retrieval import attack_retrieval, embed, retrieval_audit, retrieval_demo
from tests.conftest import forward_only

K = 10


@pytest.fixture(scope="module")
def images(image_folder):
    return load_images(str(image_folder), "train", cache_dir=None)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return create_model("preact_resnet_small").eval()


@pytest.fixture(scope="module")
def split(images):
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return to_float(images.images[perm[:8]]), images.images[perm[8:]]


@pytest.mark.parametrize("threat", [ThreatModel("linf", 8 / 255), ThreatModel("l2", 128 / 255)])
def test_attack_moves_neighbours_more_than_noise_and_stays_in_budget(encoder, split, threat):
    queries, gallery = split
    audit = retrieval_audit(encoder, queries, embed(encoder, gallery), threat, k=K, steps=10)
    assert audit["num_queries"] == 8 and audit["k"] == K and audit["mode"] == "away"
    assert audit["max_perturbation_norm"] <= threat.eps * (1 + 1e-5)
    assert audit["topk_overlap_adversarial"] < 0.8  # noise of the same size keeps > 0.9
    assert audit["topk_overlap_adversarial"] < audit["topk_overlap_random"] - 0.2
    assert audit["top1_changed_adversarial"] >= 0.5
    assert audit["cosine_to_clean_adversarial"] < audit["cosine_to_clean_random"]


def test_perturbed_queries_are_valid_images_within_the_ball(encoder, split):
    queries, gallery = split
    threat = ThreatModel("linf", 4 / 255)
    result = attack_retrieval(encoder, queries, embed(encoder, gallery), threat, k=K, steps=5)
    x_adv = result["adversarial"]
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - queries).abs().amax() <= threat.eps + 1e-6
    assert result["neighbours_clean"].shape == (8, K)
    # the neighbours are the gallery items of highest cosine similarity, best first
    sims = embed(encoder, queries) @ embed(encoder, gallery).T
    assert torch.equal(result["neighbours_clean"], sims.topk(K, dim=1).indices)


def test_toward_mode_pulls_embeddings_to_the_targets(encoder, split):
    queries, gallery = split
    gallery_emb = embed(encoder, gallery)
    targets = gallery_emb[torch.arange(8) * 7]
    before = (embed(encoder, queries) * targets).sum(1).mean().item()
    audit = retrieval_audit(encoder, queries, gallery_emb, ThreatModel("linf", 4 / 255), k=K,
                            steps=10, targets=targets)
    assert audit["mode"] == "toward"
    assert audit["cosine_to_target_adversarial"] > before


def save_random_checkpoint(path, seed: int) -> None:
    """A run's checkpoint layout around a randomly initialised encoder."""
    torch.manual_seed(seed)
    config = TrainConfig()
    config.model.arch, config.model.width = "preact_resnet_small", 1
    state = create_model("preact_resnet_small").state_dict()
    online = {f"encoder.{k}": v for k, v in state.items()}
    torch.save({"config": config.to_dict(), "online": online, "step": 0}, path)


def test_demo_writes_the_side_by_side_figure(image_folder, tmp_path):
    for seed, name in enumerate(("byol", "byorl")):
        save_random_checkpoint(tmp_path / f"{name}.pt", seed)
    threat = ThreatModel("linf", 4 / 255)
    report = retrieval_demo({"BYOL": tmp_path / "byol.pt", "BYORL": tmp_path / "byorl.pt"},
                            str(image_folder), tmp_path / "demo", threat, k=4, num_queries=4,
                            steps=3, toward=True)
    assert set(report["encoders"]) == {"BYOL", "BYORL"}
    assert report["settings"]["mode"] == "toward" and report["settings"]["gallery_size"] == 120
    for summary in report["encoders"].values():
        assert summary["max_perturbation_norm"] <= threat.eps * (1 + 1e-5)
    assert json.loads((tmp_path / "demo" / "retrieval.json").read_text()) == report
    with open(tmp_path / "demo" / "retrieval.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_square_moves_queries_with_forward_passes_only(encoder, split):
    """Black-box: Square through a module that gives no gradients still lowers the cosine to
    the clean embedding further than noise of the same size, within the budget."""
    queries, gallery = split
    threat = ThreatModel("linf", 8 / 255)
    audit = retrieval_audit(forward_only(encoder), queries[:3], embed(encoder, gallery), threat,
                            k=K, steps=100, attack="square")
    assert audit["attack"] == "square" and audit["queries"] == 100 and "steps" not in audit
    assert audit["max_perturbation_norm"] <= threat.eps * (1 + 1e-5)
    assert audit["cosine_to_clean_adversarial"] < audit["cosine_to_clean_random"]
    with pytest.raises(ValueError, match="square without targets"):
        attack_retrieval(encoder, queries[:1], gallery[:4], threat, attack="square",
                         targets=torch.zeros(1, 256))


def test_query_details_are_the_neighbours_and_the_perturbation(encoder, split):
    import base64
    import io

    from PIL import Image

    queries, gallery = split
    threat = ThreatModel("linf", 4 / 255)
    vectors = embed(encoder, gallery)
    audit = retrieval_audit(encoder, queries, vectors, threat, k=K, steps=5, details=2)
    assert len(audit["examples"]) == 2
    first = audit["examples"][0]
    sims = embed(encoder, queries[:1]) @ vectors.T
    best = sims.topk(K, dim=1)
    assert [j for j, _ in first["neighbours_clean"]] == best.indices[0].tolist()
    assert [s for _, s in first["neighbours_clean"]] == pytest.approx(best.values[0].tolist(),
                                                                      abs=1e-5)
    clean, adv = ({j for j, _ in first[f"neighbours_{kind}"]} for kind in ("clean", "adversarial"))
    assert first["topk_overlap"] == pytest.approx(len(clean & adv) / K)
    assert first["perturbation_linf"] <= threat.eps + 1e-6
    assert first["perturbation_norm"] == pytest.approx(first["perturbation_linf"])  # linf
    for name in ("adversarial_png", "perturbation_png"):
        png = Image.open(io.BytesIO(base64.b64decode(first[name])))
        assert png.size == (32, 32) and png.mode == "RGB"
    png = Image.open(io.BytesIO(base64.b64decode(first["adversarial_png"])))
    adversarial = torch.from_numpy(np.array(png)).permute(2, 0, 1).float() / 255
    assert (adversarial - queries[0]).abs().max() <= threat.eps + 0.5 / 255  # 8-bit rounding
