import base64
import io

import numpy as np
import pytest
from PIL import Image

from byorl.service.exceptions import Invalid, TooLarge
from byorl.service.serving.images import decode_base64, decode_image, decode_images
from byorl.service.settings import Settings
from byorl.training.data import decode_image as training_decode

S = Settings(model_dir="unused", data_dir="unused")


def encode(px: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(h: int, w: int, channels: int = 3) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    planes = [(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 7) % 256]
    return np.stack(planes[:channels] + [np.full_like(x, 200)] * (channels - 3), -1).astype(
        np.uint8)


def raises(code: str, status: int, fn, *args):
    """`fn(*args)` refuses with `code`, as the error class that the API answers `status` for."""
    with pytest.raises({422: Invalid, 413: TooLarge}[status]) as e:
        fn(*args)
    assert e.value.code == code, e.value
    return str(e.value)


def test_cifar_images_decode_exactly_as_in_training(image_bytes):
    for blobs in image_bytes.values():
        for b in blobs[:3]:
            np.testing.assert_array_equal(decode_image(b, 32, S), training_decode(b, 32))


@pytest.mark.parametrize("shape,mode", [((61, 97, 4), "RGBA"), ((200, 300, 3), "RGB"),
                                        ((45, 45, 3), "RGB")])
def test_other_sizes_resize_like_training(shape, mode):
    """Resize policy: any size within the limits -> input size, bicubic, as training does."""
    data = encode(gradient(shape[0], shape[1], shape[2]))
    out = decode_image(data, 32, S)
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, training_decode(data, 32))


def test_greyscale_and_palette_become_rgb():
    grey = gradient(40, 40)[..., 0]
    out = decode_image(encode(grey), 32, S)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])
    palette = Image.fromarray(gradient(40, 40)).convert("P")
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    np.testing.assert_array_equal(decode_image(buf.getvalue(), 40, S),
                                  np.asarray(palette.convert("RGB")).transpose(2, 0, 1))


def test_exif_orientation_is_applied():
    px = gradient(20, 40)  # landscape pixels, stored with "rotate 90 CW to display" (6)
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = Image.fromarray(px).transpose(Image.Transpose.ROTATE_270)
    out = decode_image(encode(px, exif=exif), 32, S)
    expected = np.asarray(upright.resize((32, 32), Image.BICUBIC)).transpose(2, 0, 1)
    np.testing.assert_array_equal(out, expected)


def test_not_an_image():
    assert "images[3]" in raises("invalid_image", 422, decode_image, b"hello world", 32, S, 3)
    gif = encode(gradient(32, 32), "GIF")  # a real image, but not an accepted format
    raises("invalid_image", 422, decode_image, gif, 32, S)
    truncated = encode(gradient(64, 64), "JPEG")[:300]
    raises("invalid_image", 422, decode_image, truncated, 32, S)


def test_decompression_bomb_is_refused_before_decoding(bomb):
    assert "144000000 pixels" in raises("image_too_large", 413, decode_image, bomb, 32, S)


def test_size_limits():
    small = Settings(model_dir="x", data_dir="x", max_image_pixels=100 * 100, max_image_side=150)
    raises("image_too_large", 413, decode_image, encode(gradient(101, 100)), 32, small)
    raises("image_too_large", 413, decode_image, encode(gradient(10, 151)), 32, small)
    assert decode_image(encode(gradient(100, 100)), 32, small).shape == (3, 32, 32)
    raises("image_too_small", 422, decode_image, encode(gradient(4, 40)), 32, S)


def test_base64():
    data = encode(gradient(32, 32))
    text = base64.b64encode(data).decode()
    assert decode_base64(text, 0) == data
    assert decode_base64("data:image/png;base64," + text, 0) == data
    assert "images[2]" in raises("invalid_base64", 422, decode_base64, "not base64!", 2)


def test_image_count_limits():
    data = encode(gradient(32, 32))
    assert decode_images([data] * 3, 32, S, limit=3).shape == (3, 3, 32, 32)
    raises("too_many_images", 413, decode_images, [data] * 4, 32, S, 3)
    raises("no_images", 422, decode_images, [], 32, S, 3)


def test_the_pixels_of_a_request_are_counted_from_the_headers():
    """MAX_REQUEST_PIXELS over all images, before any is decoded: a header whose pixels never
    follow (truncated, undecodable) is refused for its size, not for its data."""
    small = Settings(model_dir="unused", data_dir="unused", max_request_pixels=3 * 64 * 64)
    ok = encode(gradient(64, 64))
    assert decode_images([ok] * 3, 32, small, 10).shape == (3, 3, 32, 32)
    assert "12288" in raises("too_many_pixels", 413, decode_images, [ok] * 4, 32, small, 10)
    truncated = encode(gradient(200, 200))[:100]
    raises("too_many_pixels", 413, decode_images, [truncated], 32, small, 10)
    raises("invalid_image", 422, decode_images, [truncated], 32, S, 10)
