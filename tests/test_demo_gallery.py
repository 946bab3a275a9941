"""`byorl demo-gallery`'s images: the same test images, keys and labels for every model."""

import io

import numpy as np
from PIL import Image

from byorl.demo_gallery import gallery_name, read_images
from tests.conftest import SAMPLE


def test_the_shipped_sample_gives_its_jpeg_bytes_per_class():
    blobs, names = read_images(str(SAMPLE), per_class=3)
    assert len(blobs) == 30
    assert all(names.count(n) == 3 for n in set(names)) and len(set(names)) == 10
    with np.load(SAMPLE) as f:
        first = f["jpeg"][f["offsets"][0]:f["offsets"][1]].tobytes()
        assert blobs[0] == first and names[0] == str(f["classes"][f["labels"][0]])


def test_an_image_folder_is_read_by_the_projects_loader_as_png(image_folder):
    blobs, names = read_images(str(image_folder), per_class=2)
    assert len(blobs) == 20 and len(set(names)) == 10
    png = Image.open(io.BytesIO(blobs[0]))
    assert png.format == "PNG" and png.size == (32, 32)


def test_gallery_names_pair_by_group():
    assert gallery_name("cifar10", "m-1") == "cifar10--m-1"
    assert len(gallery_name("g", "x" * 80)) == 64


def test_held_out_queries_come_after_the_gallerys_images():
    gallery, names = read_images(str(SAMPLE), per_class=3)
    held_out, held_names = read_images(str(SAMPLE), per_class=2, skip=3)
    assert len(held_out) == 20 and not set(held_out) & set(gallery)
    assert sorted(set(held_names)) == sorted(set(names))
    both, _ = read_images(str(SAMPLE), per_class=5)
    assert set(both) == set(gallery) | set(held_out)


def test_a_service_that_is_not_up_is_named_in_one_line_without_a_traceback():
    from typer.testing import CliRunner

    from byorl.cli import app
    from tests.live import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = CliRunner().invoke(app, ["demo-gallery", "--api", url, "--per-class", "1"])
    assert out.exit_code == 1 and isinstance(out.exception, SystemExit), out.output
    assert f"cannot reach the service at {url}" in out.output and "make run" in out.output
    assert "Traceback" not in out.output
