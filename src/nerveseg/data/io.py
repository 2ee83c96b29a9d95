"""Read ultrasound images and their masks from disk.

Every image becomes one float32 channel in [0, 1] and every mask one bool array, whatever the
file format or PIL mode, so the rest of nerveseg never sees a file-format detail. Every problem
is raised as :class:`~nerveseg.errors.InputError` naming the file and saying how to fix it, so a
batch job can report the file and go on.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from nerveseg.data.labelme import read_labelme_mask
from nerveseg.data.limits import MAX_IMAGE_PIXELS
from nerveseg.errors import InputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "check_mask_not_empty",
    "image_size",
    "read_image",
    "read_mask",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
"""File name endings (lower case) that :func:`read_image` accepts."""

# JPEG is lossy: it turns a 0/255 mask into 0..255 noise at every edge and shifts label values,
# so a JPEG mask would silently be wrong. Masks are raster files without JPEG, or LabelMe JSON.
MASK_EXTENSIONS: tuple[str, ...] = (".png", ".tif", ".tiff", ".bmp", ".json")
"""File name endings (lower case) that :func:`read_mask` accepts."""

_JPEG_EXTENSIONS = (".jpg", ".jpeg")

# MAX_IMAGE_PIXELS (imported above from nerveseg.data.limits, where labelme reads it too): the largest
# image (height * width) that is decoded; this module's functions read this module's name.

# Luminance weights of ITU-R 601-2, the ones PIL's convert("L") uses, but applied in float so that
# no precision is lost to PIL's integer rounding.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)

_EXIF_ORIENTATION = 0x0112


# ------------------------------------------------------------------------------------------------
# Helpers shared by images and masks
# ------------------------------------------------------------------------------------------------


def _check_file(path: Path, allowed: tuple[str, ...], kind: str) -> None:
    """Raise InputError unless ``path`` is an existing, non-empty file with an allowed ending."""
    if not path.exists():
        raise InputError(path, f"{kind} file not found", "check the path and the file name")
    if not path.is_file():
        raise InputError(path, f"is not a file (expected an {kind} file)", "give the path of a file")
    if path.suffix.lower() not in allowed:
        raise InputError(
            path,
            f"unsupported {kind} file type '{path.suffix or '(none)'}'",
            f"supported types: {', '.join(allowed)}",
        )
    if path.stat().st_size == 0:
        raise InputError(path, "is empty (zero-size file)", "copy the file again; it was not written completely")


def _too_large(path: Path, pixels: int | None) -> InputError:
    size = f" ({pixels:,} pixels)" if pixels is not None else ""
    return InputError(
        path,
        f"image is too large{size}; the limit is {MAX_IMAGE_PIXELS:,} pixels",
        "downsample or crop the image to the ultrasound field of view",
    )


@contextlib.contextmanager
def _open(path: Path) -> Iterator[Image.Image]:
    """Open ``path`` lazily with PIL, refusing unreadable and oversized images before decoding.

    ``Image.open`` only parses the header, so the size check here costs nothing even for a huge
    file. The global ``PIL.Image.MAX_IMAGE_PIXELS`` is left alone (other code may rely on it);
    PIL's own bomb warning is turned into an error instead.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _too_large(path, None) from e
    except UnidentifiedImageError as e:
        raise InputError(path, "is not a readable image (unknown or corrupt format)",
                         "re-export the image as PNG") from e
    except PermissionError as e:
        raise InputError(path, f"cannot be opened: {e}", "check the file permissions") from e
    except MemoryError:
        raise
    except Exception as e:  # a corrupt header: PIL raises OSError, ValueError, SyntaxError, struct.error...
        raise InputError(path, f"is not a readable image (corrupt header: {type(e).__name__}: {e})",
                         "re-export the image as PNG") from e
    with img:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise InputError(path, f"image has zero size ({width}x{height})", "remove or replace the file")
        if width * height > MAX_IMAGE_PIXELS:
            raise _too_large(path, width * height)
        yield img


def _decode(path: Path, img: Image.Image) -> Image.Image:
    """Decode pixel data and apply EXIF orientation; a truncated or broken file is an InputError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            # Phones and some scanners store the frame unrotated plus an orientation tag; viewers
            # (and annotators) show it rotated, so masks are drawn on the rotated frame.
            oriented = ImageOps.exif_transpose(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _too_large(path, None) from e
    except MemoryError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, zlib errors...
        raise InputError(path, f"is corrupt or truncated and cannot be decoded ({e})",
                         "copy or export the file again") from e
    return oriented if oriented is not None else img


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1..8) from the header, without decoding the pixels."""
    try:
        if img.format == "PNG":
            # PngImageFile.getexif() decodes the whole image to find a late eXIf chunk; an eXIf
            # chunk before the pixel data is already in img.info, and that is where writers put it.
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        value = int(exif.get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block must not make an image unreadable; show it as stored
        return 1
    return value if 1 <= value <= 8 else 1


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------


def _to_grey_float(path: Path, img: Image.Image) -> np.ndarray:
    """Convert a decoded PIL image of any supported mode to float32 (H, W) in [0, 1]."""
    mode = img.mode
    if mode == "1":
        return np.asarray(img, dtype=np.float32)
    if mode == "L":  # in place: the largest accepted image (MAX_IMAGE_PIXELS) is one float copy, not two
        out = np.asarray(img, dtype=np.float32)
        out /= np.float32(255.0)
        return out
    if mode == "LA":
        return np.asarray(img, dtype=np.float32)[..., 0] / 255.0
    if mode.startswith("I;16"):
        out = np.asarray(img).astype(np.float32)
        out /= np.float32(65535.0)
        return out
    if mode == "I":
        # 32-bit integer mode: PIL's name for 16-bit data from some writers. Anything outside the
        # 16-bit range has no agreed scale, so it is refused instead of guessed.
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise InputError(path, "32-bit integer image with values outside 0..65535",
                             "save the image as 8-bit or 16-bit grey")
        return arr.astype(np.float32) / 65535.0
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if not np.isfinite(arr).all() or (arr.size and (arr.min() < 0.0 or arr.max() > 1.0)):
            raise InputError(path, "floating-point image with values outside [0, 1]",
                             "save the image as 8-bit or 16-bit grey")
        return arr.copy()
    if mode in ("RGB", "RGBA", "RGBX", "RGBa"):
        rgb = np.asarray(img, dtype=np.float32)[..., :3]  # alpha carries no intensity
    elif mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "La"):
        # Palette indices are not intensities: look them up through the palette first.
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    else:
        raise InputError(path, f"unsupported image mode '{mode}'", "save the image as 8-bit grey or RGB PNG")
    out = rgb @ LUMA_WEIGHTS
    out /= np.float32(255.0)
    return out


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as one grey float channel.

    Parameters
    ----------
    path : str or Path
        PNG, JPEG, TIFF or BMP; grey (8/16 bit), RGB, RGBA, palette or grey+alpha.

    Returns
    -------
    np.ndarray
        float32 array (H, W) in [0, 1], EXIF orientation applied. RGB becomes ITU-R 601-2
        luminance, 8-bit data is divided by 255 and 16-bit data by 65535.

    Raises
    ------
    InputError
        Missing, empty, unsupported, corrupt or too large (> ``MAX_IMAGE_PIXELS``) file.
    """
    path = Path(path)
    _check_file(path, IMAGE_EXTENSIONS, "image")
    with _open(path) as img:
        img = _decode(path, img)
        out = _to_grey_float(path, img)
    return np.ascontiguousarray(out, dtype=np.float32)


def image_size(path: str | Path) -> tuple[int, int]:
    """Return ``(height, width)`` of an image or raster mask from its header, without decoding.

    The size is the one :func:`read_image` returns, i.e. after EXIF orientation (orientations
    5-8 swap height and width).
    """
    path = Path(path)
    _check_file(path, IMAGE_EXTENSIONS, "image")
    with _open(path) as img:
        width, height = img.size
        if _orientation(img) >= 5:  # transpose, rotate 90/270 or transverse
            width, height = height, width
    return height, width


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------


def _normalise_label(path: Path, label: int | str | None, is_json: bool) -> int | str | None:
    """Check ``label`` and give it the type the mask format needs."""
    if label is None:
        return None
    if isinstance(label, bool):  # bool is an int subclass; True is almost certainly a mistake
        raise InputError(path, f"label must be an integer or a name, not {label!r}", "pass e.g. --label 1")
    if isinstance(label, (int, np.integer)):
        return str(int(label)) if is_json else int(label)
    if isinstance(label, str):
        if is_json:
            return label
        # Command lines deliver every label as text: "1" means pixel value 1 in a raster mask.
        try:
            return int(label.strip())
        except ValueError:
            raise InputError(
                path,
                f"label '{label}' is a name, but names only exist in LabelMe JSON masks",
                "give the pixel value of the structure (usgra-seg: nerve = 1)",
            ) from None
    raise InputError(path, f"label must be an integer or a name, not {type(label).__name__}")


def _raster_mask(path: Path, label: int | None) -> np.ndarray:
    """Read a raster mask file into a bool array."""
    with _open(path) as img:
        if img.format == "JPEG":  # a JPEG renamed to .png is still lossy
            raise InputError(path, "mask is JPEG-compressed, which changes label values",
                             "save the mask as grey or palette PNG")
        img = _decode(path, img)
        mode = img.mode
        if mode in ("RGB", "RGBA", "RGBX", "RGBa"):
            if label is not None:
                raise InputError(
                    path,
                    f"mask is colour ({mode}), so pixel value {label} is ambiguous",
                    "save the mask as grey or palette PNG with one value per label",
                )
            rgb = np.asarray(img)[..., :3]  # alpha is not a label
            return rgb.any(axis=-1)
        if mode in ("L", "P", "1") or mode.startswith("I") or mode == "F":
            # For P this is the palette INDEX, which is what label-map writers store the class in.
            values = np.asarray(img)
        elif mode in ("LA", "PA"):
            values = np.asarray(img)[..., 0]
        else:
            raise InputError(path, f"unsupported mask mode '{mode}'", "save the mask as grey or palette PNG")
        if label is None:
            return values != 0
        return values == label


def read_mask(
    path: str | Path,
    label: int | str | None = None,
    image_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Read a mask file as a bool foreground array.

    Parameters
    ----------
    path : str or Path
        Grey (8/16 bit), palette, TIFF or BMP raster, or a LabelMe ``.json``.
    label : int, str or None
        ``None``: every non-zero pixel (every shape, for LabelMe) is foreground, so 0/255 masks
        work. ``int``: pixels equal to it (palette masks: the palette index); for LabelMe, the
        shapes named ``str(label)``. ``str``: a LabelMe shape label (a numeric string is taken
        as a pixel value for raster masks).
    image_shape : (int, int), optional
        ``(H, W)`` of the image; a mask on another pixel grid is refused.

    Returns
    -------
    np.ndarray
        bool (H, W). An empty mask is returned as is; see :func:`check_mask_not_empty`.

    Raises
    ------
    InputError
        Unreadable file, int label on a colour mask, unknown LabelMe label, size mismatch.
    """
    path = Path(path)
    _check_file(path, MASK_EXTENSIONS + _JPEG_EXTENSIONS, "mask")
    suffix = path.suffix.lower()
    if suffix in _JPEG_EXTENSIONS:
        raise InputError(path, "mask is JPEG-compressed, which changes label values",
                         "save the mask as grey or palette PNG")
    is_json = suffix == ".json"
    norm = _normalise_label(path, label, is_json)
    if is_json:
        mask = read_labelme_mask(path, label=norm)  # type: ignore[arg-type]
    else:
        mask = _raster_mask(path, norm)  # type: ignore[arg-type]
    if image_shape is not None:
        expected = (int(image_shape[0]), int(image_shape[1]))
        if mask.shape != expected:
            raise InputError(
                path,
                f"mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image is "
                f"{expected[0]}x{expected[1]}",
                "masks must have the same pixel grid as their image; export the mask from the "
                "original image without resizing or cropping",
            )
    return np.ascontiguousarray(mask, dtype=bool)


def check_mask_not_empty(mask: np.ndarray, path: str | Path, label: int | str | None = None) -> None:
    """Raise InputError if ``mask`` has no foreground pixel.

    Kept apart from :func:`read_mask` because whether an empty mask is an error (training) or a
    valid "no nerve in view" frame (evaluation) is the caller's decision.
    """
    if np.any(mask):
        return
    what = "non-zero (foreground) pixel" if label is None else f"pixel of label {label}"
    raise InputError(path, f"contains no {what}",
                     "check --label (usgra-seg: nerve = 1) or remove the pair")
