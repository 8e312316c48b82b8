"""The video path every family shares: clips read and sampled as transformers reads them, each frame processed as
an image, `<video>` expanded and checked, clips spliced and generated with as images are."""

import json

import numpy as np
import pytest
import torch
from transformers.video_utils import load_video

from vlm_fusion.processing_video import FusionVideoProcessor, count_frames
from vlm_fusion.tools.tiny import tiny_image_processor

av = pytest.importorskip("av")


def write_clip(path, frames: int, size=(48, 64), fps: int = 4, codec: str = "mpeg4", seed: int = 0):
    """A clip of `frames` random-coloured frames written with PyAV; returns the frames as written."""
    rng = np.random.default_rng(seed)
    written = []
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            frame = np.repeat(np.repeat(rng.integers(0, 256, (size[0] // 16, size[1] // 16, 3), dtype=np.uint8), 16, 0),
                              16, 1)
            written.append(frame)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return written


@pytest.fixture
def processor():
    return FusionVideoProcessor.from_image_processor(tiny_image_processor(32), num_frames=4)


def test_a_file_gives_the_frames_transformers_load_video_samples(tmp_path, processor):
    path = tmp_path / "clip.mp4"
    write_clip(path, frames=10)
    expected, metadata = load_video(str(path), num_frames=4, backend="pyav")  # transformers' own reader and sampler
    assert metadata.frames_indices.tolist() == [0, 2, 5, 7]
    ours = processor.decode(str(path), sample=True)
    assert np.array_equal(ours, expected)
    # each frame's pixels are the image processor's for that frame as an image
    pixels = processor(str(path), return_tensors="pt")["pixel_values_videos"]
    as_images = tiny_image_processor(32)(list(expected), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 4, 3, 32, 32)
    assert torch.equal(pixels[0], as_images)


def test_fps_sampling_follows_transformers(tmp_path, processor):
    path = tmp_path / "clip.mp4"
    write_clip(path, frames=12, fps=4)  # 3 seconds
    expected, _ = load_video(str(path), fps=1, backend="pyav")
    ours = processor.decode(str(path), sample=True, fps=1)
    assert len(ours) == len(expected) == 3 and np.array_equal(ours, expected)


def test_a_container_without_a_frame_count_is_counted(tmp_path, processor):
    path = tmp_path / "clip.mkv"  # Matroska records no frame count: transformers' reader fails on it
    write_clip(path, frames=8)
    mp4 = tmp_path / "clip.mp4"
    write_clip(mp4, frames=8)
    assert np.array_equal(processor.decode(str(path), sample=True), processor.decode(str(mp4), sample=True))


def test_a_frames_folder_gives_the_pixels_of_its_frames_in_numbered_order(tmp_path, processor):
    from PIL import Image

    frames = np.random.default_rng(0).integers(0, 256, (12, 40, 40, 3), dtype=np.uint8)
    folder = tmp_path / "clip"
    folder.mkdir()
    for index in np.random.default_rng(1).permutation(12):  # written out of order; named without zero padding
        Image.fromarray(frames[index]).save(folder / f"frame_{index}.png")
    (folder / "notes.txt").write_text("not a frame")
    assert np.array_equal(processor.decode(str(folder), sample=False), frames)
    assert torch.equal(processor(str(folder), return_tensors="pt")["pixel_values_videos"],
                       processor(frames, return_tensors="pt")["pixel_values_videos"])
    assert count_frames(str(folder)) == 12


def test_count_frames_reads_what_decoding_finds(tmp_path, processor):
    write_clip(tmp_path / "clip.mp4", frames=10)  # MP4 records its frame count
    write_clip(tmp_path / "clip.mkv", frames=7)  # Matroska does not: counted by decoding
    assert count_frames(str(tmp_path / "clip.mp4")) == len(load_video(str(tmp_path / "clip.mp4"), backend="pyav")[0])
    assert count_frames(str(tmp_path / "clip.mkv")) == len(processor.decode(str(tmp_path / "clip.mkv"), sample=False))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="folder without frames"):
        count_frames(str(tmp_path / "empty"))
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(ValueError, match="is not a video PyAV can read"):
        count_frames(str(tmp_path / "notes.mp4"))
    with pytest.raises(ValueError, match="No video file or frames folder"):
        count_frames(str(tmp_path / "missing.mp4"))


def test_arrays_tensors_and_frame_lists_give_the_same_pixels(processor):
    clip = np.random.default_rng(1).integers(0, 256, (6, 40, 48, 3), dtype=np.uint8)
    from_array = processor(clip)["pixel_values_videos"]
    from_tensor = processor(torch.from_numpy(clip).permute(0, 3, 1, 2))["pixel_values_videos"]  # channels first
    from_list = processor([list(clip)])["pixel_values_videos"]
    assert from_array.shape == (1, 4, 3, 32, 32)
    assert np.array_equal(from_array, from_tensor) and np.array_equal(from_array, from_list)
    every = processor(clip, do_sample_frames=False)["pixel_values_videos"]
    assert every.shape[1] == 6


def test_a_file_url_a_data_url_and_per_sample_lists_give_the_file_s_pixels(tmp_path, processor):
    """What an OpenAI-style request carries (`transformers serve` passes a `video_url` part's URL as it is) and the
    `[[clip, ...], ...]` that `apply_chat_template(tokenize=True)` passes: the same pixels as the file's path."""
    import base64

    path = tmp_path / "clip.mp4"
    write_clip(path, frames=10)
    from_path = processor(str(path))["pixel_values_videos"]
    data_url = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    for source in (path.as_uri(), data_url):
        assert np.array_equal(processor(source)["pixel_values_videos"], from_path)
    per_sample = processor([[str(path)], [data_url, str(path)]])["pixel_values_videos"]
    assert per_sample.shape[0] == 3 and all(np.array_equal(clip, from_path[0]) for clip in per_sample)
    with pytest.raises(ValueError, match="not valid base64"):
        processor("data:video/mp4;base64,%%%")


def test_an_http_url_is_fetched_as_transformers_load_video_fetches_it(tmp_path, processor):
    """A clip served over http (here by a local server on 127.0.0.1): `load_video` fetches it, same pixels."""
    import functools
    import http.server
    import threading

    path = tmp_path / "clip.mp4"
    write_clip(path, frames=10)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/clip.mp4"
            assert np.array_equal(processor(url)["pixel_values_videos"], processor(str(path))["pixel_values_videos"])
        finally:
            server.shutdown()


def test_bad_clips_are_refused_in_one_line(tmp_path, processor):
    short = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="has 3 frames, fewer than num_frames=4"):
        processor(short)
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("not a video")
    with pytest.raises(ValueError, match="is not a video PyAV can read"):
        processor(str(not_a_video))
    with pytest.raises(ValueError, match="No video file"):
        processor(str(tmp_path / "missing.mp4"))
    with pytest.raises(ValueError, match="same number of frames"):
        processor([np.zeros((4, 8, 8, 3), np.uint8), np.zeros((5, 8, 8, 3), np.uint8)], do_sample_frames=False)
    with pytest.raises(ValueError, match="do_sample_frames=False"):
        processor(short, do_sample_frames=False, num_frames=2)
    with pytest.raises(ValueError, match="frame rate"):
        processor(np.zeros((8, 8, 8, 3), np.uint8), fps=1)


def test_saved_and_loaded_as_transformers_saves_video_processors(tmp_path, processor):
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "video_preprocessor_config.json").read_text())
    assert saved["video_processor_type"] == "FusionVideoProcessor" and saved["num_frames"] == 4
    loaded = FusionVideoProcessor.from_pretrained(tmp_path)
    clip = np.random.default_rng(2).integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)
    assert torch.equal(loaded(clip)["pixel_values_videos"], processor(clip)["pixel_values_videos"])
    assert loaded.to_dict() == processor.to_dict()


def test_a_processor_without_a_video_processor_refuses_videos():
    from vlm_fusion.tools.tiny import tiny_model_and_processor

    _, processor = tiny_model_and_processor("fusion_llava")
    with pytest.raises(ValueError, match="has no video processor"):
        processor(text="<video>", videos=[np.zeros((4, 8, 8, 3), np.uint8)])


@pytest.mark.parametrize("family, kwargs", [("fusion_llava", {"video_pooling": "average"}), ("fusion_blip2", {}),
                                            ("fusion_blip2", {"video_bridge": "video_qformer"}),
                                            ("fusion_flamingo", {})])
def test_the_clip_token_count_engines_ask_for_is_what_the_processor_writes(family, kwargs):
    """`_get_num_multimodal_tokens(video_sizes=...)` (transformers' API, which vLLM sizes clips with) gives each clip's
    placeholders as the processor writes them; an image-only processor counts none."""
    from vlm_fusion.tools.tiny import tiny_model_and_processor

    model, processor = tiny_model_and_processor(family, video=True, num_frames=3, **kwargs)
    inputs = processor(text=["a <video> b"], videos=[np.zeros((3, 40, 48, 3), np.uint8)])
    written = inputs["input_ids"][0].count(model.config.video_token_id)
    assert processor._get_num_multimodal_tokens(video_sizes=[(3, 40, 48)])["num_video_tokens"] == [written]
    assert written == model.config.num_video_tokens(3)
    _, image_only = tiny_model_and_processor(family)
    assert image_only._get_num_multimodal_tokens(video_sizes=[(3, 40, 48)])["num_video_tokens"] is None


def test_generate_answers_about_a_clip_file_from_the_command_line(tmp_path, capsys):
    from vlm_fusion.tools.tiny import tiny_model_and_processor
    from vlm_fusion_cli import main
    from vlm_fusion_cli.generate import build_prompt

    model, processor = tiny_model_and_processor("fusion_flamingo", video=True, num_frames=3)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    clip = tmp_path / "clip.mp4"
    write_clip(clip, frames=9)
    argv = ["generate", "--model", str(tmp_path / "model"), "--video", str(clip), "--prompt", "what happens ?",
            "--max-new-tokens", "4"]
    assert main(argv) == 0
    answer = capsys.readouterr().out.strip().splitlines()[-1]  # (deepspeed, where installed, logs to stdout first)
    prompt = build_prompt(processor, "what happens ?", raw=False, images=0, videos=1)
    inputs = processor(videos=[str(clip)], text=[prompt], return_tensors="pt")
    assert inputs["pixel_values_videos"].shape[1] == 3
    expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert answer == processor.decode(expected[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    # bad input: one line each, exit code 2
    assert main([*argv[:4], str(tmp_path / "missing.mp4"), *argv[5:]]) == 2
    assert main([*argv, "--num-frames", "20"]) == 2
    assert "fewer than num_frames=20" in capsys.readouterr().err


def test_generate_refuses_a_clip_for_a_model_that_reads_no_video(tmp_path, capsys):
    from vlm_fusion.tools.tiny import tiny_model_and_processor
    from vlm_fusion_cli import main

    model, processor = tiny_model_and_processor("fusion_llava")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    clip = tmp_path / "clip.mp4"
    write_clip(clip, frames=4)
    assert main(["generate", "--model", str(tmp_path / "model"), "--video", str(clip), "--prompt", "x"]) == 2
    assert "reads no video" in capsys.readouterr().err
