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


def decode_image(data: bytes, size: int, settings: Settings, i: int = 0) -> np.ndarray:
    """Bytes of a PNG, JPEG or WebP -> (3, size, size) uint8; a clear 4xx for anything else."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooLarge("image_too_large", f"images[{i}]: {exc}") from None
    except Exception:  # Pillow raises many types for garbage; all mean "not an image"
        raise Invalid("invalid_image",
                      f"images[{i}] is not a decodable {'/'.join(FORMATS)} image") from None
    with im:
        w, h = im.size
        if w * h > settings.max_image_pixels or max(w, h) > settings.max_image_side:
            raise TooLarge(
                "image_too_large",
                f"images[{i}] is {w}x{h}; the limits are {settings.max_image_pixels} pixels and "
                f"{settings.max_image_side} per side",
            )
        if min(w, h) < settings.min_image_side:
            raise Invalid(
                "image_too_small",
                f"images[{i}] is {w}x{h}; each side must be >= {settings.min_image_side}",
            )
        try:  # in place and no RGB -> RGB copy: a tenth of a small image's decoding time
            ImageOps.exif_transpose(im, in_place=True)
            rgb = im if im.mode == "RGB" else im.convert("RGB")
        except Exception:
            raise Invalid("invalid_image", f"images[{i}] has corrupt image data") from None
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.BICUBIC)
        return np.asarray(rgb).transpose(2, 0, 1).copy()


def decode_images(blobs: list[bytes] | list[str], size: int, settings: Settings,
                  limit: int) -> np.ndarray:
    """A request's images (bytes, or base64 text) -> (N, 3, size, size) uint8, at most `limit`
    of them (counted before any is decoded)."""
    if not blobs:
        raise Invalid("no_images", "the request holds no images")
    if len(blobs) > limit:
        raise TooLarge("too_many_images",
                       f"{len(blobs)} images in one request; the limit is {limit}")
    return np.stack([decode_image(decode_base64(b, i) if isinstance(b, str) else b, size,
                                  settings, i) for i, b in enumerate(blobs)])


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 3, H, W) -> float32 in [0, 1], the encoder's input."""
    return images.astype(np.float32) / 255.0
