"""Data on disk: reading images, DICOM, cine loops and masks, LabelMe annotations, finding and
splitting samples."""

from nerveseg.data.io import (
    IMAGE_EXTENSIONS,
    MASK_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    check_mask_not_empty,
    image_size,
    read_image,
    read_mask,
)
from nerveseg.data.labelme import read_labelme_mask, write_labelme
from nerveseg.data.media import MEDIA_EXTENSIONS, Media, read_frame, read_media
from nerveseg.data.samples import (
    Sample,
    discover_samples,
    fold_assignment,
    read_manifest,
    split_samples,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "MEDIA_EXTENSIONS",
    "Media",
    "Sample",
    "check_mask_not_empty",
    "discover_samples",
    "fold_assignment",
    "image_size",
    "read_image",
    "read_labelme_mask",
    "read_frame",
    "read_manifest",
    "read_mask",
    "read_media",
    "split_samples",
    "write_labelme",
]
