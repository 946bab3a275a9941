"""Untrusted image bytes -> validated uint8 pixels at the model's input size.

Resize policy: an image of any size within the limits is shown upright (EXIF orientation), made
RGB (alpha dropped, greyscale and palettes expanded) and resized, aspect ratio not kept, to the
model's input size with bicubic filtering: exactly what `training.data.decode_image` does to the
training images, so served and training embeddings of the same image agree. The size is checked
from the header before any pixel is decoded (decompression bombs never get decoded).
"""

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from byorl.service.exceptions import Invalid, TooLarge
from byorl.service.settings import Settings

FORMATS = ("PNG", "JPEG", "WEBP")


def decode_base64(text: str, i: int) -> bytes:
    """Standard base64, optionally as a data URL ("data:image/png;base64,...")."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Invalid("invalid_base64", f"images[{i}] is not valid base64") from None


def open_image(data: bytes, settings: Settings, i: int = 0) -> Image.Image:
    """The header of a PNG, JPEG or WebP (no pixel decoded yet), within the per-image size
    limits; a clear 4xx for anything else."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooLarge("image_too_large", f"images[{i}]: {exc}") from None
    except Exception:  # Pillow raises many types for garbage; all mean "not an image"
        raise Invalid("invalid_image",
                      f"images[{i}] is not a decodable {'/'.join(FORMATS)} image") from None
    w, h = im.size
    if w * h > settings.max_image_pixels or max(w, h) > settings.max_image_side:
        im.close()
        raise TooLarge(
            "image_too_large",
            f"images[{i}] is {w}x{h}; the limits are {settings.max_image_pixels} pixels and "
            f"{settings.max_image_side} per side",
        )
    if min(w, h) < settings.min_image_side:
        im.close()
        raise Invalid(
            "image_too_small",
            f"images[{i}] is {w}x{h}; each side must be >= {settings.min_image_side}",
        )
    return im


def to_pixels(im: Image.Image, size: int, i: int = 0) -> np.ndarray:
    """An opened image -> (3, size, size) uint8 (this is where the pixels are decoded)."""
    with im:
        try:  # in place and no RGB -> RGB copy: a tenth of a small image's decoding time
            ImageOps.exif_transpose(im, in_place=True)
            rgb = im if im.mode == "RGB" else im.convert("RGB")
        except Exception:
            raise Invalid("invalid_image", f"images[{i}] has corrupt image data") from None
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.BICUBIC)
        return np.asarray(rgb).transpose(2, 0, 1).copy()


def decode_image(data: bytes, size: int, settings: Settings, i: int = 0) -> np.ndarray:
    """Bytes of a PNG, JPEG or WebP -> (3, size, size) uint8; a clear 4xx for anything else."""
    return to_pixels(open_image(data, settings, i), size, i)


def check_request_pixels(images: list[Image.Image], settings: Settings) -> None:
    """All images of a request together within MAX_REQUEST_PIXELS, from their headers: tiny
    bodies can hold huge images (60 lossless WebPs of 944 bytes: 1 Gpixel, a minute of CPU)."""
    total = sum(im.size[0] * im.size[1] for im in images)
    if total > settings.max_request_pixels:
        for im in images:
            im.close()
        raise TooLarge("too_many_pixels", f"the request's {len(images)} images hold {total} "
                       f"pixels; the limit is MAX_REQUEST_PIXELS = {settings.max_request_pixels}")


def decode_images(blobs: list[bytes] | list[str], size: int, settings: Settings,
                  limit: int) -> np.ndarray:
    """A request's images (bytes, or base64 text) -> (N, 3, size, size) uint8, at most `limit`
    of them (counted before any is decoded) and at most MAX_REQUEST_PIXELS pixels in all (read
    from every header before any pixel is decoded)."""
    if not blobs:
        raise Invalid("no_images", "the request holds no images")
    if len(blobs) > limit:
        raise TooLarge("too_many_images",
                       f"{len(blobs)} images in one request; the limit is {limit}")
    images = []
    try:
        for i, b in enumerate(blobs):
            images.append(open_image(decode_base64(b, i) if isinstance(b, str) else b, settings, i))
    except Exception:
        for im in images:
            im.close()
        raise
    check_request_pixels(images, settings)
    return np.stack([to_pixels(im, size, i) for i, im in enumerate(images)])


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 3, H, W) -> float32 in [0, 1], the encoder's input."""
    return images.astype(np.float32) / 255.0
