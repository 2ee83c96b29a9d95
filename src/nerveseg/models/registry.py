"""One registry of architectures: ``create(name, **kwargs)`` and ``list_models()``.

Networks register themselves with ``@register_model("name")``; tests loop over
``list_models()`` so a newly registered network is tested automatically (as timm does).
"""

from __future__ import annotations

from typing import Callable, TypeVar

from torch import nn

from ..errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

T = TypeVar("T")


def register_model(name: str) -> Callable[[T], T]:
    def decorator(cls: T) -> T:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = cls  # type: ignore[assignment]
        return cls

    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def has_pretrained_encoder(name: str) -> bool:
    """Whether architecture ``name`` can start from pretrained encoder weights (``load_pretrained_encoder``)."""
    factory = _REGISTRY.get(name)
    return factory is not None and callable(getattr(factory, "load_pretrained_encoder", None))


def create(name: str, **kwargs) -> nn.Module:
    """Build the architecture registered as ``name`` with constructor ``kwargs``."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown architecture {name!r}; choose one of: {', '.join(list_models())}") from None
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for architecture {name!r}: {exc}") from None
