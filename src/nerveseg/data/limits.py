"""Size limits shared by the readers (:mod:`nerveseg.data.io`, :mod:`nerveseg.data.labelme`,
:mod:`nerveseg.data.media`). A module of its own so that the readers import the limit downward
and never each other in a circle; ``nerveseg.data.io`` re-exports it under the same name.
"""

from __future__ import annotations

__all__ = ["MAX_IMAGE_PIXELS"]

MAX_IMAGE_PIXELS: int = 50_000_000
"""Largest image (height * width) that is decoded. Ultrasound frames are well under 1e7 pixels;
anything larger is a mistake (a whole-slide scan, a stitched panorama) or a decompression bomb,
and would exhaust memory once converted to float and batched."""
