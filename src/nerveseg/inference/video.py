"""Overlay videos out (H.264, falling back to MPEG-4 Part 2) with PyAV, whose wheel ships FFmpeg.

Cine loops are read in :mod:`nerveseg.data.media`; ``VIDEO_EXTENSIONS``, ``video_info`` and
``read_video_frames`` are re-exported from there for existing callers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.media import VIDEO_EXTENSIONS, _av, read_video_frames, video_info

__all__ = ["VIDEO_EXTENSIONS", "VideoWriter", "read_video_frames", "video_info"]


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
