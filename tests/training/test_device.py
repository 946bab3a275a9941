import torch

from byorl.training.device import pick_device


def test_pick_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == pick_device("auto").type == expected
    assert pick_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert pick_device("auto", local_rank=1) == torch.device("cuda:1")
