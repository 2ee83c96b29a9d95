"""Cine loops: reading MP4/AVI/MOV with PyAV (its wheel ships FFmpeg, so no system codec is
needed) and writing overlay videos (H.264, falling back to MPEG-4 Part 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from ..data.io import LUMA_WEIGHTS
from ..errors import InputError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".m4v")


def _av():
    try:
        import av
    except ImportError:  # pragma: no cover - av is a dependency
        raise InputError(None, "reading video needs PyAV", "pip install av") from None
    return av


def video_info(path: str | Path) -> dict:
    """Frame count (may be 0 when the container does not say), frame rate, size."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(path, "file has no video stream", "pass an MP4/AVI cine loop or export frames as PNG")
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            return {"n_frames": int(stream.frames or 0), "fps": rate, "width": stream.width, "height": stream.height}
    except av.error.FFmpegError as exc:
        raise InputError(path, f"cannot open video ({exc})", "check the file is a complete MP4/AVI") from None


def read_video_frames(path: str | Path) -> Iterator[np.ndarray]:
    """Yield each frame as float32 (H, W) grey in [0, 1] (luminance of the decoded RGB)."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                rgb = frame.to_ndarray(format="rgb24").astype(np.float32)
                yield (rgb @ LUMA_WEIGHTS) / 255.0
    except av.error.FFmpegError as exc:
        raise InputError(path, f"video decoding failed ({exc})", "re-export the cine loop; frames read so far are kept") from None


class VideoWriter:
    """Write RGB uint8 frames to a video file (sizes padded to even for yuv420p)."""

    def __init__(self, path: str | Path, fps: float = 25.0):
        av = _av()
        self.container = av.open(str(path), mode="w")
        self.fps = max(1, round(fps))
        self.stream = None
        self._av = av

    def write(self, rgb: np.ndarray) -> None:
        h, w = rgb.shape[:2]
        if self.stream is None:
            for codec in ("libx264", "mpeg4"):
                try:
                    self.stream = self.container.add_stream(codec, rate=self.fps)
                    break
                except Exception:  # codec not in this FFmpeg build
                    continue
            self.stream.width, self.stream.height = w + w % 2, h + h % 2
            self.stream.pix_fmt = "yuv420p"
        padded = np.zeros((self.stream.height, self.stream.width, 3), np.uint8)
        padded[:h, :w] = rgb
        frame = self._av.VideoFrame.from_ndarray(padded, format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        if self.stream is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()
