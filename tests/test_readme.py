"""The README's command blocks: each one runs here as written (against a live service on a free
port, named through PORT / BYORL_URL or put in place of 127.0.0.1:8000), is what CI's script
runs, or says on its first line (`# needs: ...`) what it needs that a test cannot have (a GPU,
a training run, hours, the CIFAR-10 archive)."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.live import free_port, kill_group, start_process, wait_ready

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```$", README, re.M | re.S)
DEFAULT_URL = "http://127.0.0.1:8000"
# A command hidden in an indented block would escape this file: every command is fenced.
INDENTED_COMMAND = re.compile(
    r"^    (make|byorl|curl|python|bash|torchrun|for|pip|docker|celery|uvicorn|BYORL_\w+=)\s", re.M)


def block(first_line: str) -> str:
    """The README's block that starts with this line."""
    found = [text for _, text in BLOCKS if text.startswith(first_line)]
    assert len(found) == 1, f"{len(found)} README blocks start with {first_line!r}"
    return found[0]


QUICK_START = "make run\n"
CLIENT = "# the Python client"
CURL = "# or plain HTTP"
FILTER = "# a filtered search"
GALLERY = "# the running service (--url, or BYORL_URL"
CI = "make test\n"
RUN_HERE = (QUICK_START, CLIENT, CURL, FILTER, GALLERY, CI)


def test_every_block_runs_here_or_says_what_it_needs():
    assert len(BLOCKS) >= 10
    for language, text in BLOCKS:
        assert language in ("bash", "python"), f"a block without a language: {text[:60]!r}"
        assert text.startswith(RUN_HERE) or text.startswith("# needs: "), (
            f"this README block neither runs in tests/test_readme.py nor says what it "
            f"needs:\n{text}")
    assert not INDENTED_COMMAND.search(README), INDENTED_COMMAND.search(README).group(0)


def test_make_test_is_what_ci_runs():
    assert block(CI) == "make test\n"
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("\nmake test")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The quick start's first line, `make run`, on a free port (PORT) and a fresh data
    directory; its URL."""
    tmp = tmp_path_factory.mktemp("readme")
    command = block(QUICK_START).splitlines()[0]
    port = free_port()
    env = {**os.environ, "PORT": str(port), "BYORL_DATA_DIR": str(tmp / "data"),
           "BYORL_REDIS_URL": "", "BYORL_THREADS": "1"}
    proc = start_process(["bash", "-c", command], env, tmp / "make-run.log", ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=600)  # `make run` first checks the install (pip)
        yield url
    finally:
        kill_group(proc)


@pytest.fixture
def files(tmp_path, image_bytes):
    """The files the blocks name: cat.jpg, dog.png, query.jpg and a folder photos/ of 6."""
    jpegs = [blob for group in image_bytes.values() for blob in group[:2]]
    for name, blob in zip(("cat.jpg", "dog.png", "query.jpg"), jpegs, strict=False):
        (tmp_path / name).write_bytes(blob)  # JPEG bytes under a .png name: decoded by content
    (tmp_path / "photos" / "more").mkdir(parents=True)
    for i, blob in enumerate(jpegs[3:9]):
        (tmp_path / "photos" / ("more" if i % 2 else "") / f"p{i}.jpg").write_bytes(blob)
    return tmp_path


def shell(text: str, url: str, cwd) -> str:
    """A bash block, as written, with the service at `url`; its standard output."""
    env = {**os.environ, "BYORL_URL": url, "PATH": f"{os.path.dirname(sys.executable)}:"
           f"{os.environ['PATH']}"}  # `byorl` is the test environment's
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", text.replace(DEFAULT_URL, url)],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_quick_start_demo_gallery(service, tmp_path):
    """The quick start's second line, in another shell (here: from the repository's root,
    where its default sample lives): a gallery per served model."""
    second = block(QUICK_START).splitlines()[1]
    out = shell(second, service, ROOT)
    galleries = json.loads(subprocess.run(
        ["curl", "-sf", f"{service}/indexes"], capture_output=True, text=True).stdout)["items"]
    assert len(galleries) == 2 and all(g["count"] == 1000 for g in galleries), out


def python(text: str, url: str, cwd) -> list[str]:
    """A Python block, as written, with the service at `url`; the lines it printed."""
    out, here = io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(text.replace(DEFAULT_URL, url), "README", "exec"), {})
    finally:
        os.chdir(here)
    return out.getvalue().splitlines()


def test_client_and_filter_blocks(service, files):
    """The client's block (embed, import a folder, add with metadata, search), then the filtered
    search, which finds only the item whose metadata matches."""
    shape, summary, hits = python(block(CLIENT), service, files)
    assert shape == "(1, 256)" and hits.startswith("[Hit(key=")
    assert "files=6" in summary and "failed=[]" in summary, summary
    (filtered,) = python(block(FILTER), service, files)
    assert filtered.startswith("[Hit(key='cat'") and filtered.count("Hit(") == 1, filtered


def test_curl_block(service, files):
    answer = json.loads(shell(block(CURL), service, files))
    assert answer["normalized"] is False and len(answer["embeddings"]) == 1


def test_gallery_block(service, files):
    """Import a folder, export it, restore the export under another name."""
    out = shell(block(GALLERY), service, files)
    assert (files / "backup" / "pets" / "manifest.json").is_file(), out
    counts = {g["name"]: g["count"] for g in json.loads(subprocess.run(
        ["curl", "-sf", f"{service}/indexes"], capture_output=True, text=True).stdout)["items"]}
    assert counts["pets"] == counts["pets-copy"] >= 6, counts
