"""PNG encoding and decoding for the API: grey frames, label maps, overlays, probabilities.

Overlays and thumbnails are drawn on a copy shrunk for display (:func:`shrink`, at most
``DISPLAY_SIDE`` pixels on the long side), never on the full frame: the library's overlay works
in float32 RGB, about 20 bytes per pixel, which is 1 GB for a 7000x7000 frame.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..data.io import MAX_IMAGE_PIXELS
from ..errors import InputError
from ..inference.overlay import _outline, make_overlay

NERVE, VESSEL = 1, 2
DISPLAY_SIDE = 2048  # overlays are drawn at most this size: a screen shows no more
THUMBNAIL_SIDE = 160
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


def fit_size(shape: tuple[int, int], side: int) -> tuple[int, int]:
    """(height, width) of a frame of ``shape`` shrunk to fit ``side`` x ``side`` (never enlarged)."""
    h, w = shape
    scale = min(1.0, side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def shrink(array: np.ndarray, side: int, labels: bool = False) -> np.ndarray:
    """A uint8 (H, W) frame or label map shrunk to fit ``side`` (the array itself when it fits):
    a grey frame by area averaging, a label map by nearest neighbour (labels stay labels).
    PIL works on the array's own buffer, so only the small result is allocated."""
    h, w = fit_size(array.shape, side)
    if (h, w) == array.shape:
        return array
    img = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
    if labels:
        return np.asarray(img.resize((w, h), Image.Resampling.NEAREST))
    return np.asarray(img.resize((w, h), Image.Resampling.BOX, reducing_gap=2.0))


def overlay_rgb(display_u8: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The library's overlay (nerve red fill + outline) with vessels outlined in blue, on
    ``display_u8`` (a frame already shrunk for display; ``labels`` are shrunk to match)."""
    labels = shrink(labels, max(display_u8.shape), labels=True)
    rgb = make_overlay(display_u8.astype(np.float32) / 255.0, labels == NERVE)
    vessel = labels == VESSEL
    if vessel.any():
        thickness = max(1, round(max(labels.shape) / 300))
        rgb[_outline(vessel, thickness)] = VESSEL_RGB
    return rgb


def overlay_png(image_u8: np.ndarray, labels: np.ndarray, side: int = DISPLAY_SIDE) -> bytes:
    """PNG of the overlay at display size: the frame's own size up to ``side``, shrunk beyond."""
    return png_bytes(overlay_rgb(shrink(image_u8, side), labels))


def thumbnail_png(image_u8: np.ndarray, labels: np.ndarray, side: int = THUMBNAIL_SIDE) -> bytes:
    """A small overlay: frame and labels are shrunk first, then drawn (a few KB of work at any size)."""
    return png_bytes(overlay_rgb(shrink(image_u8, side), labels))


def read_label_png(data: bytes, name: str, shape: tuple[int, int]) -> np.ndarray:
    """A corrected mask sent by a client -> uint8 labels (0, 1 nerve, 2 vessel) of ``shape``.

    Accepted: grey, palette or 1-bit PNG whose values are 0/1/2 (label map, usgra-seg layout)
    or 0/255 (nerve only). RGB(A) is refused: colours are not labels. The size is checked from
    the header, before decoding: what is decoded is never larger than the frame.
    """
    try:
        img = Image.open(io.BytesIO(data))
        if img.format != "PNG":
            raise InputError(name, f"the mask is {img.format or 'not an image'}, not PNG", "send the mask as a PNG")
        width, height = img.size
        if (height, width) != tuple(shape):
            raise InputError(name, f"the mask is {width}x{height} but the frame is {shape[1]}x{shape[0]} (width x height)",
                             "send a mask of exactly the frame's size")
        if width * height > MAX_IMAGE_PIXELS:
            raise InputError(name, "the mask is too large", "send a mask of the frame's size")
        img.load()
    except InputError:
        raise
    except Exception as exc:  # PIL: UnidentifiedImageError, OSError, SyntaxError, zlib errors...
        raise InputError(name, f"the mask is not a readable PNG ({type(exc).__name__})", "send a grey or palette PNG") from None
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
