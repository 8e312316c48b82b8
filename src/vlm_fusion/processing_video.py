"""Clips to `pixel_values_videos`: decode, sample frames the transformers way, and process each frame as an image.

transformers' own video processors (`BaseVideoProcessor`) run on torchvision, which a CPU-only PyTorch from PyPI
cannot import beside it; and their pixels differ from the PIL image path by the resampler. This one keeps the
transformers contract — `videos=` as a local file, an array `(frames, height, width, channels)`, a tensor or a list
of frames; `do_sample_frames`, `num_frames`, `fps`; frames decoded by `transformers.video_utils.load_video`
(PyAV) and picked by its `default_sample_indices_fn` — and hands every frame to an ordinary image processor (the
model's own, PIL backend), so a frame of a clip and the same picture given as an image get the same pixels.

Legend: V videos, F frames per video, C channels, H height, W width.
"""

import base64
import binascii
import json
import os
import re
import tempfile
import urllib.parse
import urllib.request

import numpy as np
import torch
from transformers import BatchFeature
from transformers.utils import VIDEO_PROCESSOR_NAME
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import VideoMetadata, default_sample_indices_fn, load_video

# A frames folder's frames: its images, in the order of the last number in their names (frame_2 before frame_10)
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# Where video_preprocessor_config.json keeps the frames' image processor (its `to_dict()` and class name).
_FRAME_PROCESSOR_KEY = "frame_processor"


class _NoFrameCount(Exception):
    """The container does not say how many frames it holds: they are counted by decoding them all."""


def _image_processor_class(name: str):
    from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name

    cls = get_image_processor_class_from_name(name)
    if cls is None:
        raise ValueError(f"Unknown image processor class {name!r} for the frames of a video.")
    return cls


def frame_files(folder: str) -> list[str]:
    """The frames of a frames folder (`clips/0001/` holding `000.png`, `001.png`, ...), in order: sorted by the last
    number in each file's name, then by name. Refuses a folder without images."""
    def order(name):
        numbers = re.findall(r"\d+", name)
        return (int(numbers[-1]) if numbers else -1, name)

    names = sorted((n for n in os.listdir(folder) if n.lower().endswith(FRAME_SUFFIXES)), key=order)
    if not names:
        raise ValueError(f"{folder} is a folder without frames (images named {', '.join(FRAME_SUFFIXES)}).")
    return [os.path.join(folder, name) for name in names]


def count_frames(source: str) -> int:
    """How many frames the clip at `source` (a video file or a frames folder) holds, read from the container's header
    where it records the count (MP4), else by decoding; for a check before training, without keeping any frame."""
    if os.path.isdir(source):
        return len(frame_files(source))
    if not os.path.isfile(source):
        raise ValueError(f"No video file or frames folder at {source!r}.")
    import av

    try:
        with av.open(source) as container:
            if not container.streams.video:
                raise ValueError(f"{source} holds no video stream.")
            total = container.streams.video[0].frames
            return total or sum(1 for _ in container.decode(video=0))
    except av.error.FFmpegError as error:
        raise ValueError(f"{source} is not a video PyAV can read ({type(error).__name__}: {error}).") from None


class FusionVideoProcessor(VideoProcessorMixin):
    r"""
    Turns clips into `pixel_values_videos` `(num_videos, num_frames, channels, height, width)`.

    Args:
        frame_processor (`BaseImageProcessor` or `dict`, *optional*):
            The image processor every frame goes through (an image processor, or its `to_dict()` with its
            `image_processor_type`). Defaults to CLIP's.
        num_frames (`int`, *optional*, defaults to 8): frames sampled from each clip (uniformly, as transformers
            samples them), when `do_sample_frames`.
        fps (`float`, *optional*): sample this many frames per second of the clip instead (a file, or a clip given
            with its `video_metadata`); exclusive with an explicit `num_frames`.
        do_sample_frames (`bool`, *optional*, defaults to `True`): `False` keeps every frame given.

    A clip with fewer frames than asked is refused (never padded or repeated silently); clips in one call must come
    out with the same number of frames.
    """

    model_input_names = ["pixel_values_videos"]

    def __init__(self, frame_processor=None, num_frames: int | None = 8, fps: float | None = None,
                 do_sample_frames: bool = True, **kwargs):
        for key in ("video_processor_type", "processor_class", "image_processor_type"):
            kwargs.pop(key, None)
        super().__init__()
        if frame_processor is None:
            from transformers import CLIPImageProcessor

            frame_processor = CLIPImageProcessor()
        if isinstance(frame_processor, dict):
            settings = dict(frame_processor)
            frame_processor = _image_processor_class(settings.pop("image_processor_type")).from_dict(settings)
        if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1):
            raise ValueError(f"`num_frames` must be a positive integer, got {num_frames!r}.")
        self.frame_processor = frame_processor
        self.num_frames = num_frames
        self.fps = fps
        self.do_sample_frames = bool(do_sample_frames)

    # ---- saving: the frame processor as its dict ------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "video_processor_type": type(self).__name__,
            _FRAME_PROCESSOR_KEY: self.frame_processor.to_dict(),
            "num_frames": self.num_frames,
            "fps": self.fps,
            "do_sample_frames": self.do_sample_frames,
        }

    @classmethod
    def from_dict(cls, video_processor_dict: dict, **kwargs):
        settings = {**video_processor_dict}
        return_unused = kwargs.pop("return_unused_kwargs", False)
        for key in ("num_frames", "fps", "do_sample_frames"):
            if key in kwargs:
                settings[key] = kwargs.pop(key)
        processor = cls(**settings)
        return (processor, kwargs) if return_unused else processor

    @classmethod
    def load_if_saved(cls, pretrained_model_name_or_path, **kwargs) -> "FusionVideoProcessor | None":
        """The video processor saved beside a processor (a folder or a Hub repo), or `None` when there is none."""
        from transformers.utils import cached_file

        hub = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token", "local_files_only") if k in kwargs}
        path = cached_file(pretrained_model_name_or_path, VIDEO_PROCESSOR_NAME, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **hub)
        return cls.from_json_file(path) if path else None

    @classmethod
    def from_json_file(cls, json_file):
        with open(json_file, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    @classmethod
    def from_image_processor(cls, image_processor, **kwargs) -> "FusionVideoProcessor":
        """A video processor whose frames go through (a copy of) `image_processor`."""
        return cls(frame_processor=image_processor.to_dict() | {"image_processor_type": type(image_processor).__name__},
                   **kwargs)

    # ---- frames ---------------------------------------------------------------------------------------------
    def sample_indices(self, total: int, name: str, num_frames=None, fps=None, video_fps=None) -> np.ndarray:
        """The frames transformers' `default_sample_indices_fn` picks; refuses a clip shorter than asked."""
        if num_frames is not None and fps is not None:
            raise ValueError("`num_frames` and `fps` are exclusive: give one of them.")
        if fps is None:
            num_frames = num_frames if num_frames is not None else self.num_frames
            fps = self.fps if num_frames is None else None
        if fps is not None and video_fps is None:
            raise ValueError(f"{name}: sampling at fps={fps} needs the clip's own frame rate (a file, or "
                             "`video_metadata`); give `num_frames` instead.")
        if total < 1:
            raise ValueError(f"{name} has no frames.")
        if num_frames is not None and num_frames > total:
            raise ValueError(f"{name} has {total} frames, fewer than num_frames={num_frames}: clips are not padded or "
                             "repeated; ask for fewer frames.")
        metadata = VideoMetadata(total_num_frames=total, fps=video_fps)
        return default_sample_indices_fn(metadata, num_frames=num_frames, fps=fps)

    def decode(self, source: str, sample: bool, **sampling) -> np.ndarray:
        """The frames of the clip at `source`, `(F, H, W, C)` uint8, sampled if asked (PyAV, through `load_video`).

        `source` is a local file, a frames folder (its images in order, see `frame_files`; only the sampled ones are
        opened), a `file://` URL, an `http(s)://` URL (fetched by `load_video`) or a base64 `data:`
        URL (what an OpenAI-style request carries: `transformers serve` hands a `video_url` part's URL over as it is).
        """
        if source.startswith("data:"):
            header, _, payload = source.partition(",")
            if not header.endswith(";base64"):
                raise ValueError(f"A clip given as a data URL must be base64 (data:video/mp4;base64,...), got "
                                 f"{header[:60]!r}.")
            try:
                data = base64.b64decode(payload, validate=True)
            except binascii.Error as error:
                raise ValueError(f"The clip's data URL is not valid base64 ({error}).") from None
            with tempfile.TemporaryDirectory() as folder:  # `load_video` reads files and URLs, not bytes
                path = os.path.join(folder, "clip")
                with open(path, "wb") as handle:
                    handle.write(data)
                return self._decode_file(path, f"the clip of a data URL ({len(data)} bytes)", sample, **sampling)
        if source.startswith("file://"):
            url = urllib.parse.urlparse(source)
            if url.netloc not in ("", "localhost"):
                raise ValueError(f"{source}: a file URL of another host; give a local file.")
            source = urllib.request.url2pathname(url.path)
        if os.path.isdir(source):
            return self._decode_folder(source, sample, **sampling)
        if not source.startswith(("http://", "https://")) and not os.path.isfile(source):
            raise ValueError(f"No video file or frames folder at {source!r}.")
        return self._decode_file(source, source, sample, **sampling)

    def _decode_file(self, path: str, name: str, sample: bool, **sampling) -> np.ndarray:
        def pick(metadata, **_):
            total = metadata.total_num_frames
            if not total:  # a container that records no frame count (MKV, WebM)
                raise _NoFrameCount
            if not sample:
                return np.arange(total)
            return self.sample_indices(total, name, video_fps=metadata.fps, **sampling)

        try:
            import av
        except ImportError as error:
            raise ImportError("Reading a video file needs PyAV: pip install av") from error
        try:
            frames, _ = load_video(path, backend="pyav", sample_indices_fn=pick)
        except _NoFrameCount:
            return self._decode_counting(path, name, sample, **sampling)
        except (av.error.FFmpegError, IndexError, StopIteration) as error:
            raise ValueError(f"{name} is not a video PyAV can read ({type(error).__name__}: {error}).") from None
        return frames

    def _decode_folder(self, folder: str, sample: bool, **sampling) -> np.ndarray:
        from PIL import Image

        files = frame_files(folder)
        if sample:
            files = [files[i] for i in self.sample_indices(len(files), folder, **sampling)]
        frames = []
        for file in files:
            with Image.open(file) as image:
                frames.append(np.asarray(image.convert("RGB")))
        if len({frame.shape for frame in frames}) > 1:
            raise ValueError(f"{folder}: its frames differ in size ({sorted({f.shape[:2] for f in frames})}).")
        return np.stack(frames)

    def _decode_counting(self, path: str, name: str, sample: bool, **sampling) -> np.ndarray:
        import av

        with av.open(path) as container:
            stream = container.streams.video[0]
            frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
            fps = float(stream.average_rate) if stream.average_rate else None
        if not sample:
            return frames
        return frames[self.sample_indices(len(frames), name, video_fps=fps, **sampling)]

    def clip_frames(self, video, index: int, sample: bool, metadata=None, **sampling) -> list:
        """One clip as a list of frames, sampled if asked."""
        name = f"video {index}"
        if isinstance(video, (str, os.PathLike)):
            return list(self.decode(str(video), sample, **sampling))
        if isinstance(video, (np.ndarray, torch.Tensor)):
            if video.ndim != 4:
                raise ValueError(f"{name}: a clip given as an array must be (frames, height, width, channels) or "
                                 f"(frames, channels, height, width), got shape {tuple(video.shape)}.")
            frames = list(video)
        elif isinstance(video, (list, tuple)):
            frames = list(video)
        else:
            raise ValueError(f"{name}: a clip is a file path, an array of frames or a list of frames, got "
                             f"{type(video).__name__}.")
        if not sample:
            return frames
        video_fps = getattr(metadata, "fps", None) if metadata is not None else None
        if isinstance(metadata, dict):
            video_fps = metadata.get("fps")
        return [frames[i] for i in self.sample_indices(len(frames), name, video_fps=video_fps, **sampling)]

    def __call__(self, videos, **kwargs) -> BatchFeature:
        return self.preprocess(videos, **kwargs)

    def preprocess(self, videos, num_frames: int | None = None, fps: float | None = None,
                   do_sample_frames: bool | None = None, video_metadata=None, return_tensors=None,
                   **frame_kwargs) -> BatchFeature:
        r"""
        Args:
            videos: one clip, a list of clips or a list of them per sample; a clip is a local video file (or a
                `file://`, http(s) or base64 `data:` URL), an array or tensor `(frames, height, width, channels)` (or
                channels first), or a list of frames (PIL images or arrays).
            num_frames, fps, do_sample_frames: override the processor's.
            video_metadata: per clip (a `VideoMetadata` or a dict with `fps`), to sample arrays by `fps`.

        Returns:
            [`BatchFeature`] with `pixel_values_videos` `(num_videos, num_frames, channels, height, width)`.
        """
        frame_kwargs.pop("return_metadata", None)
        sample = self.do_sample_frames if do_sample_frames is None else do_sample_frames
        if not sample and (num_frames is not None or fps is not None):
            raise ValueError("`num_frames` / `fps` were given with do_sample_frames=False, which keeps every frame: "
                             "set do_sample_frames=True to sample.")
        clips = self.batched(videos)
        metadata = video_metadata if isinstance(video_metadata, (list, tuple)) else [video_metadata] * len(clips)
        framed = [self.clip_frames(clip, i, sample, meta, num_frames=num_frames, fps=fps)
                  for i, (clip, meta) in enumerate(zip(clips, metadata))]
        counts = sorted({len(frames) for frames in framed})
        if len(counts) > 1:
            raise ValueError(f"The clips of one call must have the same number of frames, got {counts}: sample them "
                             "to one `num_frames`.")
        flat = [self.to_image(frame) for frames in framed for frame in frames]
        pixels = self.frame_processor(flat, return_tensors="pt", **frame_kwargs)["pixel_values"]  # (V*F, C, H, W)
        pixels = pixels.reshape(len(framed), counts[0], *pixels.shape[1:])  # (V, F, C, H, W)
        return BatchFeature({"pixel_values_videos": pixels}, tensor_type=return_tensors)

    @staticmethod
    def to_image(frame):
        if isinstance(frame, torch.Tensor):
            frame = frame.numpy()
        if isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[0] in (1, 3) and frame.shape[-1] not in (1, 3):
            frame = frame.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        return frame

    @staticmethod
    def is_clip(item) -> bool:
        """A file or URL, an array `(F, H, W, C)` or a list of frames; a frame alone is not."""
        return isinstance(item, (str, os.PathLike, list, tuple)) or (
            isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4)

    @staticmethod
    def batched(videos) -> list:
        """A clip, a list of clips, or one list of clips per sample (`apply_chat_template(tokenize=True)` passes
        `[[url, ...], ...]`) -> a flat list of clips, in order."""
        if isinstance(videos, (str, os.PathLike)):
            return [videos]
        if isinstance(videos, (np.ndarray, torch.Tensor)):
            return [videos] if videos.ndim == 4 else list(videos)
        if isinstance(videos, (list, tuple)) and videos:
            is_clip = FusionVideoProcessor.is_clip
            if all(isinstance(sample, (list, tuple)) for sample in videos) and any(
                    sample and is_clip(sample[0]) for sample in videos):  # per sample, its clips
                return [clip for sample in videos for clip in sample]
            if is_clip(videos[0]):
                return list(videos)
            return [list(videos)]  # one clip as a list of frames
        raise ValueError(f"No clip in {type(videos).__name__} {videos!r}.")


def num_frames_of(video_inputs: dict, video_idx: int) -> int:
    """The frame count of clip `video_idx` in a video processor's output."""
    return int(video_inputs["pixel_values_videos"][video_idx].shape[0])

