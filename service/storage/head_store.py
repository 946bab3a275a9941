"""Fitted linear heads, the product of `POST /linear-head` jobs, in the data directory:

    heads/<id>/head.npz     weight (classes, dim) and bias of a fitted linear head
    heads/<id>/head.json    classes, model, threat model, metrics (written last: the head exists)
"""

import shutil
from pathlib import Path

import numpy as np

from byorl.files import read_json, read_npz, write_json, write_npz
from byorl.service.exceptions import NotFound
from byorl.service.names import check_name


class HeadStore:
    def __init__(self, root: Path):
        self.root = Path(root) / "heads"

    def save(self, head_id: str, weight: np.ndarray, bias: np.ndarray, card: dict) -> None:
        write_npz(self.root / head_id / "head.npz", weight=weight, bias=bias)
        write_json(self.root / head_id / "head.json", card)

    def card(self, head_id: str) -> dict:
        path = self.root / check_name(head_id, "head") / "head.json"
        if not path.exists():
            raise NotFound("head", head_id)
        return read_json(path)

    def weights(self, head_id: str) -> tuple[np.ndarray, np.ndarray]:
        self.card(head_id)
        w = read_npz(self.root / head_id / "head.npz")
        return w["weight"], w["bias"]

    def list(self) -> list[dict]:
        cards = [read_json(p) for p in self.root.glob("*/head.json")]
        return sorted(cards, key=lambda c: c["created_at"])

    def delete(self, head_id: str) -> None:
        path = self.root / check_name(head_id, "head") / "head.json"
        if not path.exists():
            raise NotFound("head", head_id)
        path.unlink()  # the head is gone the moment its card is
        shutil.rmtree(path.parent, ignore_errors=True)
