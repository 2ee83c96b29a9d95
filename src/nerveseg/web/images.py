"""PNG encoding and decoding for the API: grey frames, label maps, overlays, probabilities."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..data.io import MAX_IMAGE_PIXELS
from ..errors import InputError
from ..inference.overlay import _outline, make_overlay

NERVE, VESSEL = 1, 2
# Label-map palette: background black, nerve red, vessel blue (index = label value).
PALETTE = [0, 0, 0, 255, 60, 60, 60, 140, 255] + [0, 0, 0] * 253
VESSEL_RGB = (60, 140, 255)


def png_bytes(array: np.ndarray) -> bytes:
    """PNG of a uint8 (H, W) or (H, W, 3) array; fast zlib level (these go over loopback)."""
    img = Image.fromarray(array)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def label_png(labels: np.ndarray) -> bytes:
    """Palette PNG whose pixel values are the labels (0 background, 1 nerve, 2 vessel):
    the same layout as usgra-seg's masks, and coloured in any image viewer."""
    img = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.astype(np.uint8).tobytes())
    img.putpalette(PALETTE)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def overlay_png(image_u8: np.ndarray, labels: np.ndarray) -> bytes:
    """The library's overlay (nerve red fill + outline) with vessels outlined in blue."""
    rgb = make_overlay(image_u8.astype(np.float32) / 255.0, labels == NERVE)
    vessel = labels == VESSEL
    if vessel.any():
        thickness = max(1, round(max(labels.shape) / 300))
        rgb[_outline(vessel, thickness)] = VESSEL_RGB
    return png_bytes(rgb)


def thumbnail_png(image_u8: np.ndarray, labels: np.ndarray, side: int = 160) -> bytes:
    rgb = make_overlay(image_u8.astype(np.float32) / 255.0, labels == NERVE)
    img = Image.fromarray(rgb)
    img.thumbnail((side, side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def read_label_png(data: bytes, name: str, shape: tuple[int, int]) -> np.ndarray:
    """A corrected mask sent by a client -> uint8 labels (0, 1 nerve, 2 vessel) of ``shape``.

    Accepted: grey, palette or 1-bit PNG whose values are 0/1/2 (label map, usgra-seg layout)
    or 0/255 (nerve only). RGB(A) is refused: colours are not labels.
    """
    try:
        img = Image.open(io.BytesIO(data))
        if img.format != "PNG":
            raise InputError(name, f"the mask is {img.format or 'not an image'}, not PNG", "send the mask as a PNG")
        width, height = img.size
        if width * height > MAX_IMAGE_PIXELS:
            raise InputError(name, "the mask is too large", "send a mask of the frame's size")
        img.load()
    except InputError:
        raise
    except Exception as exc:  # PIL: UnidentifiedImageError, OSError, SyntaxError, zlib errors...
        raise InputError(name, f"the mask is not a readable PNG ({type(exc).__name__})", "send a grey or palette PNG") from None
    if (height, width) != tuple(shape):
        raise InputError(name, f"the mask is {width}x{height} but the frame is {shape[1]}x{shape[0]} (width x height)",
                         "send a mask of exactly the frame's size")
    if img.mode == "1":
        arr = np.asarray(img, dtype=np.uint8)
    elif img.mode in ("L", "P"):
        arr = np.asarray(img, dtype=np.uint8)
    elif img.mode == "LA":
        arr = np.asarray(img, dtype=np.uint8)[..., 0]
    else:
        raise InputError(name, f"the mask has colour mode {img.mode}", "send a grey or palette PNG with values 0/1/2 or 0/255")
    values = set(np.unique(arr).tolist())
    if values <= {0, 255}:
        return (arr == 255).astype(np.uint8)
    if values <= {0, 1, 2}:
        return arr.copy()
    raise InputError(name, f"the mask holds values {sorted(values)[:8]}", "use 0 background, 1 nerve, 2 vessel (or 0/255 for nerve)")
