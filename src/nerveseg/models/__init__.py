"""Networks: blocks, one file per architecture, and the registry that builds them by name."""

from . import attention_unet, efficientnet_unet, monai_peers, multires_unet, sa_unet, unet, unet_pp  # noqa: F401  (registers the architectures)
from .base import SegmentationModel, replace_modules_
from .blocks import ECA, SAConv, eca_kernel_size
from .complexity import count_gflops, count_parameters
from .registry import create, has_pretrained_encoder, list_models, register_model

__all__ = [
    "replace_modules_",
    "SegmentationModel",
    "ECA",
    "SAConv",
    "eca_kernel_size",
    "count_gflops",
    "count_parameters",
    "create",
    "has_pretrained_encoder",
    "list_models",
    "register_model",
]
