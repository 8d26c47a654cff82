"""MP4 video files of camera frames through PyAV: append episodes, read frames at timestamps.

Frames are encoded with H.264 (libx264, yuv420p, a keyframe every `gop` frames so random access
decodes at most `gop` frames) at a constant frame rate: frame k of a file has pts k and
timestamp k / fps, which is how the dataset's episodes index into a shared file.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

CODEC = 'libx264'
PIX_FMT = 'yuv420p'


class VideoWriter:
    """Appends RGB frames (H, W, 3) uint8 to one mp4; `frame_count / fps` is the next timestamp."""

    def __init__(self, path: Path, fps: int, width: int, height: int, crf: int = 18,
                 gop: int = 2) -> None:
        import av

        if width % 2 or height % 2:
            raise ValueError(f'video frames need even width and height for {PIX_FMT}, got '
                             f'{width}x{height}')
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fps = fps
        self.width, self.height = width, height
        self._container = av.open(str(path), mode='w')
        self._stream = self._container.add_stream(CODEC, rate=fps)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = PIX_FMT
        self._stream.codec_context.gop_size = gop
        self._stream.options = {'crf': str(crf), 'preset': 'veryfast', 'tune': 'zerolatency',
                                'x264-params': f'keyint={gop}:min-keyint=1:scenecut=0'}
        self.frame_count = 0
        self._av = av

    def write(self, frame: np.ndarray) -> None:
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(f'{self.path}: frame must be uint8 ({self.height}, {self.width}, 3),'
                             f' got {frame.dtype} {frame.shape}')
        vf = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format='rgb24')
        vf.pts = self.frame_count
        vf.time_base = Fraction(1, self.fps)
        for packet in self._stream.encode(vf):
            self._container.mux(packet)
        self.frame_count += 1

    def size_bytes(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()


class VideoReader:
    """Random access to frames of one mp4 by frame index (= round(timestamp * fps))."""

    def __init__(self, path: Path) -> None:
        import av

        if not path.is_file():
            raise FileNotFoundError(f'video file {path} is missing')
        self.path = path
        self._container = av.open(str(path))
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = 'AUTO'
        self._next_index: int | None = None   # index of the frame the decoder yields next
        self._frames = None

    def _time_base_pts(self, index: int) -> int:
        rate = self._stream.average_rate or self._stream.guessed_rate
        seconds = Fraction(index) / Fraction(rate)
        return int(seconds / self._stream.time_base)

    def _pts_to_index(self, pts: int) -> int:
        rate = self._stream.average_rate or self._stream.guessed_rate
        return int(round(float(pts * self._stream.time_base * rate)))

    def read(self, indices: list[int] | np.ndarray) -> np.ndarray:
        """Frames at the given indices (any order) -> (len(indices), H, W, 3) uint8."""
        wanted = sorted(set(int(i) for i in indices))
        found: dict[int, np.ndarray] = {}
        for index in wanted:
            if index in found:
                continue
            ahead = self._next_index
            if ahead is None or index < ahead or index > ahead + 8:
                self._container.seek(self._time_base_pts(index), stream=self._stream,
                                     backward=True, any_frame=False)
                self._frames = self._container.decode(self._stream)
                self._next_index = -1
            for frame in self._frames:
                current = self._pts_to_index(frame.pts)
                self._next_index = current + 1
                if current in wanted and current not in found:
                    found[current] = frame.to_ndarray(format='rgb24')
                if current >= index:
                    break
            if index not in found:
                raise IndexError(f'{self.path}: no frame {index}')
        return np.stack([found[int(i)] for i in indices])

    def close(self) -> None:
        self._container.close()
