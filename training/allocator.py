"""The CPU memory allocator of the `byorl` command: jemalloc that keeps the pages it frees.

Why: glibc's malloc returns every block above its mmap threshold (at most 32 MiB; one batch-128
activation of the small ResNet is 32 MiB, the two views concatenated 64 MiB) to the kernel on
free, and the next step page-faults it in again, zero-filled. On this project's 2-core EPYC a
quarter of a BYORL training step was kernel time; jemalloc with page decay off spends none
(`python bench/bench_allocator.py`, numbers in the README). PyTorch's performance guide
recommends the same (its `torch.backends.xeon.run_cpu --enable-jemalloc` launcher sets it too).

A preloaded allocator must be in place before Python starts, so the console script re-executes
itself once with LD_PRELOAD when the machine has jemalloc (Debian: libjemalloc2), on Linux only.
`BYORL_ALLOCATOR=system` keeps glibc's. Memory stays bounded: freed pages are kept for reuse,
so the resident size is the run's peak working set.
"""

import ctypes.util
import os
import sys
from collections.abc import Mapping

OPT_OUT = "BYORL_ALLOCATOR"
# Never hand dirty or lazily-freed pages back to the kernel: the next step reuses them.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def find_jemalloc() -> str | None:
    """jemalloc's shared library as the dynamic loader names it, or None (not Linux, not there)."""
    return ctypes.util.find_library("jemalloc") if sys.platform == "linux" else None


def preload_env(environ: Mapping[str, str], library: str | None) -> dict[str, str] | None:
    """The environment to re-execute with so that `library` (jemalloc) is the allocator, or None
    when there is nothing to do: no library, opted out, or already preloaded (by the user or by
    the re-execution itself)."""
    preloaded = environ.get("LD_PRELOAD", "")
    if library is None or environ.get(OPT_OUT) == "system" or "jemalloc" in preloaded:
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = f"{library} {preloaded}".strip()
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


def reexec_with_jemalloc() -> None:
    """Replace this process by the same command with jemalloc preloaded (see the module doc);
    returns only when there is nothing to do. Call it first thing, before work starts."""
    env = preload_env(os.environ, find_jemalloc())
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        # the interpreter's own command line: `python -m byorl.cli` stays a module run
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
