"""The trial of a user's ONNX encoder, run in a child process (`python -m` this module) so that
the graph cannot take the api with it: the child limits its own address space
(MODEL_TRIAL_MEMORY_BYTES beyond what the runtime already maps) and the parent its wall clock
(MODEL_TRIAL_TIMEOUT_S).

The child reads the ONNX bytes on stdin and prints one JSON line: `{"dim": D}`, or `{"code",
"message"}` naming the first problem. ONNX Runtime must open the graph in an empty working
folder: an initializer whose data lies in an external file (any file the server can read) finds
nothing there, and ONNX Runtime refuses absolute paths and paths that leave the folder. Its
input is one float (N, 3, S, S) with a free batch axis; runs on seeded batches of 1, 2 and 4
must each return one finite vector per image, the same length every time, at most
MAX_MODEL_DIM (a graph that reshapes to a fixed batch passes one size only).
"""

import json
import resource
import sys

import numpy as np
import onnxruntime as ort

from byorl import model_dir
from byorl.service.exceptions import Invalid

TRIAL_BATCHES = (1, 2, 4)


def open_session(data: bytes) -> ort.InferenceSession:
    """ONNX Runtime's session of the uploaded bytes, on the CPU with one thread, as a user's
    graph is served (`model_dir.restrict_untrusted`)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    try:
        return ort.InferenceSession(data, model_dir.restrict_untrusted(options),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several types for a bad graph
        raise Invalid("invalid_onnx", "ONNX Runtime cannot load the file within "
                      "MODEL_TRIAL_MEMORY_BYTES and without external data files: "
                      f"{str(exc)[:300]}") from None


def check_signature(session: ort.InferenceSession, size: int) -> None:
    """One float input (N, 3, S, S) with a free batch axis, and at least one output."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise Invalid("invalid_signature", f"the encoder takes {len(inputs)} inputs; it must "
                      "take exactly one (float32 NCHW pixels in [0, 1])")
    (x,) = inputs
    if x.type != "tensor(float)" or len(x.shape) != 4:
        raise Invalid("invalid_signature", f"input {x.name!r} is {x.type} of shape {x.shape}; "
                      "expected tensor(float) of shape (N, 3, S, S)")
    batch, *rest = x.shape
    if isinstance(batch, int):
        raise Invalid("invalid_signature", f"input {x.name!r} has a fixed batch size {batch}; "
                      "export it with a dynamic batch axis")
    for got, want, what in zip(rest, (3, size, size), ("channels", "height", "width"),
                               strict=True):
        if isinstance(got, int) and got != want:
            raise Invalid("invalid_signature", f"input {x.name!r} has {got} {what}; the card "
                          f"declares (3, {size}, {size})")


def run_batch(session: ort.InferenceSession, n: int, size: int) -> np.ndarray:
    """The outputs of a seeded random batch of n images at the declared size."""
    x = np.random.default_rng(n).random((n, 3, size, size), dtype=np.float32)
    try:
        return model_dir.embed(session, x)
    except Exception as exc:
        raise Invalid("onnx_run_failed", f"the encoder failed on a batch of {n} images of "
                      f"3x{size}x{size} (within MODEL_TRIAL_MEMORY_BYTES): {str(exc)[:300]}"
                      ) from None


def trial_run(session: ort.InferenceSession, size: int, max_dim: int) -> int:
    """The embedding size, the same at every trial batch size, of finite outputs."""
    dims = set()
    for n in TRIAL_BATCHES:
        out = run_batch(session, n, size)
        if out.ndim != 2 or out.shape[0] != n:
            raise Invalid("invalid_output", f"the encoder returned shape {list(out.shape)} for "
                          f"{n} images; expected one vector per image, ({n}, D)")
        if not 1 <= out.shape[1] <= max_dim:
            raise Invalid("invalid_output", f"the encoder returns vectors of {out.shape[1]} "
                          f"numbers; the limit is MAX_MODEL_DIM = {max_dim}")
        if not np.isfinite(out).all():
            raise Invalid("invalid_output", "the encoder returned NaN or infinity")
        dims.add(out.shape[1])
    if len(dims) > 1:
        raise Invalid("invalid_output", f"the encoder's vector length changes with the batch "
                      f"size: {sorted(dims)}")
    return dims.pop()


def limit_memory(extra_bytes: int) -> None:
    """Cap this process's address space at what it maps now plus `extra_bytes`: an allocation
    past it fails inside ONNX Runtime instead of growing the machine's memory."""
    with open("/proc/self/status") as status:
        mapped_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    cap = mapped_kb * 1024 + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def trial(data: bytes, size: int, max_dim: int) -> dict:
    """The child's answer for the uploaded bytes: the vector length, or the problem."""
    try:
        session = open_session(data)
        check_signature(session, size)
        return {"dim": trial_run(session, size, max_dim)}
    except Invalid as exc:
        return {"code": exc.code, "message": str(exc)}
    except MemoryError:
        return {"code": "trial_out_of_memory", "message": "the encoder's trial ran out of its "
                "memory (MODEL_TRIAL_MEMORY_BYTES)"}


def main() -> None:
    size, max_dim, memory = (int(a) for a in sys.argv[1:4])
    data = sys.stdin.buffer.read()
    limit_memory(memory)
    print(json.dumps(trial(data, size, max_dim)), flush=True)


if __name__ == "__main__":
    main()
