"""Build-time check of a GPU image: every CUDA build installed in it (torch, onnxruntime-gpu)
has the CUDA major.minor of the base image (CUDA_VERSION, set by nvidia/cuda images), or the
build fails naming the mismatch. faiss-gpu-cu12 is the exception: it brings its own CUDA 12
runtime from pip (PyPI has no CUDA 13 faiss-gpu), which the CUDA 13 driver runs."""

import os
import re
import sys
from importlib import metadata

base = ".".join(os.environ["CUDA_VERSION"].split(".")[:2])
builds = {}
try:
    import torch

    builds["torch"] = torch.version.cuda
except ImportError:
    pass
try:
    runtime = next(r for r in metadata.requires("onnxruntime-gpu") or []
                   if r.startswith("nvidia-cuda-runtime"))
    builds["onnxruntime-gpu"] = re.search(r"(\d+\.\d+)", runtime).group(1)
except metadata.PackageNotFoundError:
    pass
wrong = {name: cuda for name, cuda in builds.items() if cuda != base}
print(f"base image CUDA {base}; builds: {builds}")
sys.exit(f"CUDA builds that do not match the base image's {base}: {wrong}" if wrong else 0)
