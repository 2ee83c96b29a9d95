"""Settings of one ``nerveseg serve`` process, fixed at start-up and validated once."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

MB = 1024 * 1024


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeSettings:
    """Everything the server needs; the CLI builds one from its flags.

    ``workspace`` is where corrected cases are saved as training pairs (``images/``,
    ``masks/``, ``manifest.csv``) and fine-tuning runs go (``finetune/``); it never changes
    while the server runs. ``token``: the bearer token every API call must carry (compared in
    constant time); required unless ``host`` is a loopback address or ``no_auth`` is set.
    Limits: uploads are cut off while streaming at ``max_image_mb`` (PNG, JPEG, TIFF, BMP) or
    ``max_video_mb`` (MP4/AVI, DICOM, which may be a cine loop); a cine loop may have at most
    ``max_frames`` frames, and a frame at most ``max_megapixels`` million pixels (checked from
    the file's header, before it is decoded: a 48 KB PNG may declare 7000x7000). The case store
    keeps at most ``max_cases`` cases and ``max_store_mb`` of arrays in memory, evicting the
    least recently used. ``workers``
    segmentations run at once, ``max_queue`` more may wait; beyond that the server answers
    503 with Retry-After. Slow clients: a request body that sends nothing for
    ``body_timeout_s`` seconds, or averages under ``security.MIN_BODY_RATE`` after them, is cut off
    (408), and a connection must send its request headers within ``header_timeout_s``;
    ``max_connections`` is uvicorn's ``limit_concurrency``. ``keep_finetune_runs``: the
    newest fine-tuning runs kept in ``workspace/finetune/``; older run folders are deleted when a
    new run starts.
    """

    model_dir: Path
    workspace: Path
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    no_auth: bool = False
    backend: str = "auto"
    device: str = "auto"
    max_image_mb: float = 50
    max_video_mb: float = 500
    max_frames: int = 1000
    max_cases: int = 64
    max_store_mb: float = 1024
    workers: int = 1
    max_queue: int = 16
    finetune_epochs: int = 10
    max_megapixels: float = 40
    body_timeout_s: float = 30
    header_timeout_s: float = 10
    max_connections: int = 256
    keep_finetune_runs: int = 5

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be 1-65535, got {self.port}")
        if self.token is not None and not _printable_ascii(self.token):
            # a header carries Latin-1 at best and a browser's fetch() refuses anything but
            # ISO-8859-1: a token with other characters could never be sent, so never match
            raise ConfigError("--token must be printable ASCII (letters, digits, punctuation; no spaces or accents): "
                              "browsers cannot send other characters in a header "
                              "(e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")
        if self.token is not None and len(self.token) < 16:
            raise ConfigError("--token must be at least 16 characters (e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")
        if self.token and self.no_auth:
            raise ConfigError("give either --token or --no-auth, not both")
        if not is_loopback(self.host) and not self.token and not self.no_auth:
            raise ConfigError(f"--host {self.host} accepts connections from other machines: give --token T "
                              "(every request then needs 'Authorization: Bearer T'), or --no-auth to allow anyone on the network")
        for name in ("max_image_mb", "max_video_mb", "max_store_mb", "max_megapixels", "body_timeout_s",
                     "header_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{_flag(name)} must be > 0")
        for name in ("max_frames", "max_cases", "workers", "finetune_epochs", "max_connections", "keep_finetune_runs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)} must be >= 1")
        if self.max_queue < 0:
            raise ConfigError("max-queue must be >= 0")
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        object.__setattr__(self, "workspace", Path(self.workspace).resolve())

    @property
    def auth_required(self) -> bool:
        return self.token is not None

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * MB)

    @property
    def max_video_bytes(self) -> int:
        return int(self.max_video_mb * MB)

    @property
    def max_store_bytes(self) -> int:
        return int(self.max_store_mb * MB)

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1_000_000)


def _flag(name: str) -> str:
    """The command-line flag of a setting (``body_timeout_s`` is ``--body-timeout``)."""
    return "--" + name.removesuffix("_s").replace("_", "-")


def _printable_ascii(text: str) -> bool:
    return all(33 <= ord(ch) <= 126 for ch in text)
