"""MP4 encoding and decoding of camera streams (PyAV), as LeRobot v3 stores them.

Frames are (T, H, W, 3) uint8 RGB. One file holds the frames of many episodes back to back; an
episode is addressed by its time range in the file, `[from_timestamp, to_timestamp)` seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CODEC = "libx264"
PIX_FMT = "yuv420p"


class VideoWriter:
    """Appends (T, H, W, 3) uint8 frames to one H.264 file, one frame per 1/fps seconds."""

    def __init__(self, path: Path, fps: int, height: int, width: int, crf: int = 16):
        import av

        self.path = Path(path)
        self.container = av.open(str(path), mode="w", format="mp4")
        self.stream = self.container.add_stream(CODEC, rate=fps)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, PIX_FMT
        # All-intra: cheap random access, and a bad frame cannot spread; these streams are small.
        self.stream.options = {"crf": str(crf), "g": "1", "preset": "veryfast"}
        self.frames = 0

    def write(self, frames: np.ndarray) -> None:
        import av

        for image in frames:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = self.frames
            self.container.mux(self.stream.encode(frame))
            self.frames += 1

    def close(self) -> None:
        self.container.mux(self.stream.encode())
        self.container.close()


def encode_video(frames: np.ndarray, path: Path, fps: int) -> None:
    """Write `frames` (T, H, W, 3) uint8 to `path` as one H.264 stream."""
    writer = VideoWriter(path, fps, *frames.shape[1:3])
    writer.write(frames)
    writer.close()


def video_info(path: Path) -> dict:
    """The `info` block LeRobot stores with a video feature."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return {
            "video.height": stream.height,
            "video.width": stream.width,
            "video.codec": stream.codec_context.name,
            "video.pix_fmt": stream.codec_context.pix_fmt,
            "video.is_depth_map": False,
            "video.fps": float(stream.average_rate),
            "video.channels": 3,
            "has_audio": bool(container.streams.audio),
        }


def decode_video(path: Path, from_timestamp: float, to_timestamp: float, fps: float) -> np.ndarray:
    """Decode the frames whose timestamps lie in [from_timestamp, to_timestamp): (T, H, W, 3) uint8.

    Frames are matched to timestamps within half a frame period; a file that ends early or cannot
    be decoded raises `ValueError` naming the file.
    """
    import av

    expected = round((to_timestamp - from_timestamp) * fps)
    half_period = 0.5 / fps
    frames = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # FFmpeg's frame and slice threads
            # to the keyframe at or before the first frame: in our all-intra streams, the first
            # frame itself (tested also on streams with keyframes 12 frames apart and B-frames)
            start = max(from_timestamp - half_period, 0.0)
            container.seek(int(start / stream.time_base), stream=stream)
            for frame in container.decode(stream):
                time = float(frame.pts * stream.time_base)
                if time < from_timestamp - half_period:
                    continue
                if time >= to_timestamp - half_period:
                    break
                frames.append(frame.to_ndarray(format="rgb24"))
    except (av.error.FFmpegError, OSError) as error:
        raise ValueError(f"cannot decode video {path}: {error}") from error
    if len(frames) != expected:
        raise ValueError(
            f"video {path} holds {len(frames)} frames in [{from_timestamp:.4f}, "
            f"{to_timestamp:.4f}) s, expected {expected} at {fps} fps: truncated or corrupt"
        )
    return np.stack(frames)
