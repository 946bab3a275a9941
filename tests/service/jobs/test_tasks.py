"""Job functions run in this process (with PyTorch), on a real data directory and model."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from byorl.model_dir import embed, load_onnx_session, read_card
from byorl.service.jobs import tasks
from byorl.service.settings import Settings
from byorl.service.storage.database import open_database
from byorl.service.storage.galleries import Galleries
from byorl.service.storage.head_store import HeadStore
from byorl.service.storage.job_store import JobStore
from byorl.service.storage.report_store import ReportStore
from byorl.training.checkpoint import load_torch_encoder
from byorl.training.linear_classifier import L2_GRID, Classifier
from tests.live import wait_for


def run(job_id: str, data, model_dir) -> dict | None:
    return tasks.run_job(job_id, Settings(data_dir=data, model_dir=model_dir, threads=1))


def jobs_of(data, **kw) -> JobStore:
    """The job records that `run` sees (the data directory's embedded database)."""
    return JobStore(db_of(data), data, **kw)


def db_of(data):
    return open_database(Settings(data_dir=data).database())


def easy_set(n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Two classes any encoder tells apart: dark and bright images with a little noise."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    base = np.where(labels[:, None, None, None] == 1, 200, 40)
    images = np.clip(base + rng.normal(0, 15, (n, 3, 32, 32)), 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


@pytest.fixture(scope="module")
def fitted(model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    images, labels = easy_set()
    params = {"classes": ["dark", "bright"], "robust": False,
              "threat": {"norm": "linf", "eps": 8 / 255}, "epochs": 4, "attack_steps": 2,
              "min_steps": 40, "validation_fraction": 0.25,
              "model_id": read_card(model_dir)["model_id"]}
    job = jobs_of(data).create("linear_head", params, images=images, labels=labels)
    result = run(job["id"], data, model_dir)
    return data, job["id"], result, images, labels


def test_fit_head_learns_and_the_saved_head_is_the_torch_classifier(fitted, model_dir):
    data, job_id, result, images, labels = fitted
    record = jobs_of(data).get(job_id)
    assert record["state"] == "succeeded" and record["progress"] == 1.0
    assert record["attempts"] == 1 and record["result"] == result
    assert result["head_id"] == job_id
    metrics = result["metrics"]
    assert metrics["num_train"] == 18 and metrics["num_val"] == 6
    assert metrics["head_kind"] == "l2" and metrics["l2"] in L2_GRID  # chosen on the 6 held out
    assert metrics["train_accuracy"] == 1.0 and metrics["best_val_accuracy"] == 1.0

    # The api predicts with numpy on ONNX Runtime embeddings; that must be the torch classifier.
    weight, bias = HeadStore(db_of(data)).weights(job_id)
    logits = embed(load_onnx_session(model_dir, threads=1), images) @ weight.T + bias
    head = torch.nn.Linear(*weight.shape[::-1])
    head.load_state_dict({"weight": torch.from_numpy(weight), "bias": torch.from_numpy(bias)})
    with torch.no_grad():
        ref = Classifier(load_torch_encoder(model_dir), head)(torch.from_numpy(images) / 255.0)
    np.testing.assert_allclose(logits, ref.numpy(), atol=1e-3)
    assert (logits.argmax(1) == labels).all()


def test_a_second_delivery_of_a_finished_job_does_nothing(fitted, model_dir):
    data, job_id, result, _, _ = fitted
    heads = HeadStore(db_of(data))
    before = heads.card(job_id), heads.weights(job_id)
    assert run(job_id, data, model_dir) == result
    assert jobs_of(data).get(job_id)["attempts"] == 1
    after = heads.card(job_id), heads.weights(job_id)
    assert after[0] == before[0]  # the same head (its creation time included), not a new fit
    for a, b in zip(after[1], before[1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_failing_job_records_why(model_dir, tmp_path):
    images, labels = easy_set(4)
    job = jobs_of(tmp_path).create("linear_head", {"model_id": "some-other-model"},
                                    images=images, labels=labels)
    with pytest.raises(LookupError, match="some-other-model"):
        run(job["id"], tmp_path, model_dir)
    record = jobs_of(tmp_path).get(job["id"])
    assert record["state"] == "failed" and "some-other-model" in record["error"]


def test_robustness_audit_report(fitted, model_dir):
    data, head_id, _, images, labels = fitted
    params = {"audit": "robustness", "head_id": head_id, "mode": "quick",
              "threat": {"norm": "linf", "eps": 8 / 255},
              "model_id": read_card(model_dir)["model_id"]}
    job = jobs_of(data).create("audit", params, images=images[:4], labels=labels[:4])
    result = run(job["id"], data, model_dir)
    report = ReportStore(db_of(data)).get(job["id"])
    assert result["audit_id"] == job["id"] and report["head_id"] == head_id
    assert report["n"] == 4 and report["mode"] == "quick"
    assert report["clean_accuracy"] == 1.0  # the easy set, as fitted above
    assert 0 <= report["robust_accuracy"] <= report["clean_accuracy"]
    assert report["threat_model"] == {"norm": "linf", "eps": 8 / 255}
    assert {a["name"] for a in report["attacks"]} >= {"apgd-ce", "square"}
    assert result["summary"]["robust_accuracy"] == report["robust_accuracy"]


def test_retrieval_audit_report(model_dir, tmp_path):
    card = read_card(model_dir)
    images, _ = easy_set(12)
    vectors = embed(load_onnx_session(model_dir, threads=1), images)
    Galleries(tmp_path).create("g", card["embedding_dim"], card["model_id"])
    Galleries(tmp_path).add("g", [f"k{i}" for i in range(12)], vectors, images, None,
                          card["model_id"])
    params = {"audit": "retrieval", "index": "g", "k": 3, "steps": 3,
              "threat": {"norm": "l2", "eps": 0.5}, "model_id": card["model_id"]}
    job = jobs_of(tmp_path).create("audit", params, images=images[:2])
    run(job["id"], tmp_path, model_dir)
    report = ReportStore(db_of(tmp_path)).get(job["id"])
    assert report["num_queries"] == 2 and report["k"] == 3 and report["gallery_size"] == 12
    assert report["norm"] == "l2" and report["max_perturbation_norm"] <= 0.5 + 1e-4
    for kind in ("adversarial", "random"):
        assert 0 <= report[f"topk_overlap_{kind}"] <= 1


def test_a_runner_whose_lease_was_taken_stops_and_records_nothing(model_dir, tmp_path):
    """The sweep presumed the runner dead and queued the job again: the old run must not
    complete it (the new run will)."""
    images, labels = easy_set()
    params = {"classes": ["dark", "bright"], "robust": False,
              "threat": {"norm": "linf", "eps": 8 / 255}, "epochs": 1000, "attack_steps": 1,
              "min_steps": 0, "validation_fraction": 0,
              "model_id": read_card(model_dir)["model_id"]}
    jobs = jobs_of(tmp_path)
    job_id = jobs.create("linear_head", params, images=images, labels=labels)["id"]
    with ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(run, job_id, tmp_path, model_dir)
        wait_for(lambda: jobs.get(job_id)["progress"] > 0, 120, "the job to make progress")
        assert jobs_of(tmp_path, lease_s=0).sweep(lambda _: None) == [job_id]
        assert outcome.result(timeout=120) is None
    job = jobs.get(job_id)
    assert job["state"] == "queued" and job["result"] is None and job["attempts"] == 1
    assert job["progress"] < 1
    assert not (tmp_path / "heads" / job_id).exists()


def test_an_audit_says_why_its_number_is_an_upper_bound():
    """Only the paper's full suite, white-box, measures robustness; every other audit says
    what makes its number an upper bound."""
    full, quick = {"audit": "robustness", "mode": "full"}, {"audit": "robustness", "mode": "quick"}
    assert tasks.upper_bound_reasons(full, white_box=True) == []
    assert [r.split(":")[0] for r in tasks.upper_bound_reasons(quick, white_box=False)] == [
        "black-box", "mode 'quick'"]
    assert tasks.upper_bound_reasons({"audit": "retrieval"}, white_box=True) == [
        "retrieval: one attack on each query, not an attack suite"]
