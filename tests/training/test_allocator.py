import os
import subprocess
import sys

from byorl.training.allocator import JEMALLOC_CONF, find_jemalloc, preload_env


def test_preload_env_adds_jemalloc_before_an_existing_preload_and_keeps_a_users_conf():
    env = preload_env({"PATH": "/bin", "LD_PRELOAD": "libfoo.so"}, "libjemalloc.so.2")
    assert env == {"PATH": "/bin", "LD_PRELOAD": "libjemalloc.so.2 libfoo.so",
                   "MALLOC_CONF": JEMALLOC_CONF}
    env = preload_env({"MALLOC_CONF": "narenas:1"}, "libjemalloc.so.2")
    assert env == {"LD_PRELOAD": "libjemalloc.so.2", "MALLOC_CONF": "narenas:1"}


def test_preload_env_is_none_without_the_library_when_opted_out_or_already_preloaded():
    assert preload_env({}, None) is None
    assert preload_env({"BYORL_ALLOCATOR": "system"}, "libjemalloc.so.2") is None
    assert preload_env({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "libjemalloc.so.2") is None


PROBE = """
import sys
from byorl.training.allocator import reexec_with_jemalloc
reexec_with_jemalloc()
print(sys.argv[1:], "jemalloc" in open("/proc/self/maps").read())
"""


def mapped_jemalloc(tmp_path, env: dict) -> bool:
    """Whether a program that calls reexec_with_jemalloc() first ends up with jemalloc mapped,
    run as a script and as `python -c` (the command line of `python -m` is kept the same way)."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    answers = set()
    for command in ([str(script)], ["-c", PROBE]):
        out = subprocess.run([sys.executable, *command, "a", "b c"], env=env,
                             capture_output=True, text=True, check=True).stdout
        assert out.startswith("['a', 'b c']")  # the same arguments after the re-execution
        answers.add(out.split()[-1])
    (answer,) = answers
    return answer == "True"


def test_reexec_preloads_jemalloc_once_and_honours_the_opt_out(tmp_path, monkeypatch):
    # The machines this project runs on have it (Debian libjemalloc2; .ci/run installs it).
    assert find_jemalloc(), "jemalloc not found: apt-get install libjemalloc2"
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("BYORL_ALLOCATOR", raising=False)
    assert mapped_jemalloc(tmp_path, dict(os.environ))
    assert not mapped_jemalloc(tmp_path, {**os.environ, "BYORL_ALLOCATOR": "system"})


def test_python_m_byorl_cli_runs_as_a_module_after_the_reexecution():
    out = subprocess.run([sys.executable, "-m", "byorl.cli", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "train" in out.stdout
