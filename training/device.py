"""Where tensors go: one rule for training, the baselines, evaluation and the study."""

import torch


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto`: this process's GPU (cuda:LOCAL_RANK under torchrun) when CUDA works, else the
    CPU; any other name is taken as a torch device."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
