"""Videos as sequences of images: counting and reading frames (RGB), writing annotated frames back.

OpenCV (``cv2``, installed with albumentations) does the decoding. A video's frames become images of
their own (``ImageEntry.frame``), named ``clip.mp4#frame=000012`` in result files. Readers are kept
open per process and read forward, so a DataLoader worker that gets consecutive batches of one video
decodes it once; a jump backwards reopens the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dyhead_cli.errors import DyheadError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")


def _cv2():
    # FFmpeg's own messages ("moov atom not found") go straight to stderr, beside the one line we print
    # about the same file: quiet (AV_LOG_QUIET) unless the user set a level. Read when a video is opened.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    try:
        import cv2
    except ImportError:  # pragma: no cover - albumentations depends on opencv
        raise DyheadError("reading videos needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def is_video_file(path: Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def frame_name(file_name: str, frame: int) -> str:
    """How a frame is named in result files: ``clip.mp4#frame=000012``."""
    return f"{file_name}#frame={frame:06d}"


def split_frame_name(name: str) -> tuple[str, int] | None:
    """``frame_name``'s inverse: ``clip.mp4#frame=000012`` -> ("clip.mp4", 12); None for other names."""
    video, sep, index = str(name).rpartition("#frame=")
    if not sep or not index.isdigit() or not is_video_file(Path(video)):
        return None
    return video, int(index)


def video_info(path: Path) -> tuple[int, float] | None:
    """(number of frames, frames per second), or None when OpenCV cannot open ``path`` as a video.

    The container's frame count is trusted when it gives one; otherwise the frames are counted by
    grabbing them all (streams without an index).
    """
    cv2 = _cv2()
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            return None
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        if count <= 0:
            count = 0
            while cap.grab():
                count += 1
        if count == 0:
            return None
        return count, fps if fps > 0 else 25.0
    finally:
        cap.release()


class FrameReader:
    """Random access to frames, fast when they are asked for in increasing order (one open capture)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.cap = None
        self.next_index = 0

    def read(self, path: Path, index: int) -> np.ndarray:
        """Frame ``index`` of ``path`` as an (H, W, 3) uint8 RGB array."""
        cv2 = _cv2()
        if self.cap is None or self.path != path or index < self.next_index:
            self.close()
            self.cap, self.path, self.next_index = cv2.VideoCapture(str(path)), path, 0
            if not self.cap.isOpened():
                raise DyheadError(f"cannot open video {path}")
        while self.next_index < index:
            if not self.cap.grab():
                raise DyheadError(f"cannot read frame {index} of {path} (the video ends at frame {self.next_index})")
            self.next_index += 1
        ok, bgr = self.cap.read()
        if not ok or bgr is None:
            raise DyheadError(f"cannot read frame {index} of {path}")
        self.next_index += 1
        return np.ascontiguousarray(bgr[:, :, ::-1])

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
        self.cap, self.path, self.next_index = None, None, 0


class VideoWriter:
    """Write RGB frames to a video (mp4v in .mp4/.mov/.m4v, MJPG otherwise); the size is the first frame's.

    The frames go to a hidden file beside ``path`` (same extension: OpenCV picks the container by it) that
    ``close()`` renames to ``path`` and ``abort()`` deletes, so an interrupted run leaves no cut video.
    """

    def __init__(self, path: Path, fps: float) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.stem}.tmp-{os.getpid()}{self.path.suffix}")
        self.fps = fps
        self.writer = None

    def write(self, rgb: np.ndarray) -> None:
        cv2 = _cv2()
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            codec = "mp4v" if self.path.suffix.lower() in (".mp4", ".mov", ".m4v") else "MJPG"
            h, w = rgb.shape[:2]
            self.size = (w, h)
            self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*codec), self.fps, self.size)
            if not self.writer.isOpened():
                self.abort()
                raise DyheadError(f"cannot write video {self.path} (codec {codec})")
        frame = np.ascontiguousarray(rgb[:, :, ::-1])
        if (frame.shape[1], frame.shape[0]) != self.size:
            frame = cv2.resize(frame, self.size)
        self.writer.write(frame)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop what was written; ``path`` keeps whatever it held before."""
        if self.writer is not None:
            self.writer.release()
            self.writer = None
        self.tmp.unlink(missing_ok=True)
