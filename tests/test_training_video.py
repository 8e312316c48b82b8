"""`vlm-fusion train` on clips: LLaVA-Video's JSON layout with video files and frames folders, beside images; the data
pass checks every clip and its items are the processor's own; bad clips are one line; a killed run resumes exactly."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import random_image
from test_training import BRIDGES, KILLED_RUN
from test_training_streaming import assert_equal_batches, streamed_batches
from test_video import write_clip
from vlm_fusion.tools.tiny import write_training_clips, write_training_parts
from vlm_fusion.training import TrainOptions, train
from vlm_fusion.training.cache import prepare
from vlm_fusion.training.conversations import ConversationDataset
from vlm_fusion.training.data import load
from vlm_fusion.training.encoding import encode
from vlm_fusion.training.models import load_generation_model

pytest.importorskip("av")
FRAMES = 4  # sampled from each clip's 6


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return write_training_clips(write_training_parts(tmp_path_factory.mktemp("parts")))


def options(parts, out, family="llava", stage="align", data="videos.json", **kwargs):
    defaults = dict(data=str(parts / data), image_folder=str(parts / "images"), output_dir=str(out), stage=stage,
                    family=family, vision_tower=str(parts / "vision"), language_model=str(parts / "lm"),
                    bridge=BRIDGES[family], num_frames=FRAMES, batch_size=4, max_steps=4, logging_steps=1,
                    save_steps=100, bridge_lr=1e-2, lm_lr=1e-3)
    return TrainOptions(**{**defaults, **kwargs})


@pytest.mark.parametrize("family,stage", [("llava", "align"), ("blip2", "instruct"), ("flamingo", "flamingo")])
def test_each_family_trains_on_clips_beside_images_and_saves_a_model_that_reads_them(parts, family, stage, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    data = "videos.json" if stage == "align" else "mixed.json"  # align: clip captions; then clips, images and text
    summary = train(options(parts, tmp_path, family, stage, data))
    assert summary["steps"] == 4 and np.isfinite(summary["final_loss"])
    model = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert processor.video_processor.num_frames == FRAMES and model.config.video_token_id == processor.video_token_id
    clip = str(parts / "images" / "clips" / "0000.mp4")
    inputs = processor(videos=[clip], text=["USER: <video>\nwhich way does the square move ?\nASSISTANT:"],
                       return_tensors="pt")
    assert inputs["pixel_values_videos"].shape[:2] == (1, FRAMES)
    with torch.no_grad():
        assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.parametrize("family", list(BRIDGES))
def test_the_data_pass_gives_the_reference_encoding_and_the_processors_own_clips(parts, family, tmp_path):
    """Each cached item (ids and labels expanded from the data pass's rows, frames decoded in the item) equals the
    reference encoder's ids and labels and the processor's own pixels for the sample's images and clips; a second
    pass reads the cache and gives the same items."""
    _, processor = load_generation_model(options(parts, tmp_path, family), weights=False)
    conversations, _ = load(str(parts / "mixed.json"), str(parts / "images"))
    assert sum(bool(c.videos) for c in conversations) == 8 and sum(bool(c.images) for c in conversations) == 6
    first = prepare(str(parts / "mixed.json"), str(parts / "images"), processor, "chat", "\n", root=str(tmp_path),
                    workers=0, show_progress=False)
    again = prepare(str(parts / "mixed.json"), str(parts / "images"), processor, "chat", "\n", root=str(tmp_path),
                    workers=0, show_progress=False)
    assert first.built and not again.built
    for index, conversation in enumerate(conversations):
        item, cached = ConversationDataset(processor, first)[index], ConversationDataset(processor, again)[index]
        sizes = [(32, 32)] * len(conversation.images)
        reference = encode(processor, conversation, sizes, "chat", "\n")
        assert item["input_ids"].tolist() == reference.input_ids and item["labels"].tolist() == reference.labels
        if conversation.videos:  # the processor's pixels for the clip, as inference reads it
            own = processor(videos=conversation.videos, text=[reference.text], return_tensors="pt")
            assert torch.equal(item["pixel_values_videos"], own["pixel_values_videos"])
            assert item["pixel_values_videos"].shape[1] == FRAMES
            assert (item["input_ids"] == processor.video_token_id).sum() == processor.num_video_tokens(FRAMES)
        assert item.keys() == cached.keys() and all(torch.equal(item[k], cached[k]) for k in item)


def test_a_changed_frame_in_a_frames_folder_rebuilds_the_cache(parts, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(parts / "images", data / "images")
    shutil.copy(parts / "videos.json", data)
    _, processor = load_generation_model(options(parts, tmp_path), weights=False)

    def built():
        return prepare(str(data / "videos.json"), str(data / "images"), processor, "plain", "\n",
                       root=str(tmp_path / "cache"), workers=0, show_progress=False).built

    assert built() and not built()
    frame = data / "images" / "clips" / "0001" / "frame_3.png"
    frame.write_bytes(frame.read_bytes())  # the same pixels, a new modification time
    os.utime(frame, ns=(frame.stat().st_atime_ns, frame.stat().st_mtime_ns + 10**9))
    assert built()


def test_llava_nexts_image_marker_on_a_video_sample_marks_the_clip(parts, tmp_path):
    rows = json.loads((parts / "videos.json").read_text())
    for row in rows:  # as LLaVA-Video-178K writes it
        row["conversations"][0]["value"] = row["conversations"][0]["value"].replace("<video>", "<image>")
    (tmp_path / "next.json").write_text(json.dumps(rows))
    ours, _ = load(str(parts / "videos.json"), str(parts / "images"))
    theirs, _ = load(str(tmp_path / "next.json"), str(parts / "images"))
    assert [c.messages for c in theirs] == [c.messages for c in ours] and [c.videos for c in theirs] == \
        [c.videos for c in ours]


def broken(parts, folder, how) -> list:
    """The clip data (rows; clips in `folder`) with one thing wrong."""
    rows = json.loads((parts / "videos.json").read_text())
    if how == "undecodable clip":
        (folder / "clips" / "0002.mp4").write_bytes(b"not a video")
    elif how == "too few frames":
        for name in ("frame_4.png", "frame_5.png", "frame_3.png"):
            (folder / "clips" / "0003" / name).unlink()
    elif how == "missing clip":
        rows[4]["video"] = "clips/nowhere.mp4"
    elif how == "two markers, one clip":
        rows[1]["conversations"][0]["value"] = "<video> <video>\nwhich way ?"
    return rows


BAD = [("undecodable clip", r"sample clip2: clip .*0002\.mp4: .*0002\.mp4 is not a video PyAV can read"),
       ("too few frames", r"sample clip3: clip .*0003/ has 3 frames, fewer than the 4 the model samples"),
       ("missing clip", r"sample clip4: clip .*nowhere\.mp4: No video file or frames folder"),
       ("two markers, one clip", r"sample clip1: 2 <video> marker\(s\) and 1 clip\(s\)"),
       ("model reads no video", r"sample clip0 has a clip \(<video>\) and the model reads no video: .*--num-frames"),
       ("clips in BLIP-2's stage 1", r"sample clip0: a clip \(<video>\); BLIP-2's stage 1 .* image-caption pairs")]


@pytest.mark.parametrize("how,message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_clip_is_one_line_before_training_and_nothing_is_written(parts, tmp_path, capsys, how, message):
    from vlm_fusion_cli import main

    shutil.copytree(parts / "images", tmp_path / "images")
    rows = broken(parts, tmp_path / "images", how)
    (tmp_path / "data.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    if how == "clips in BLIP-2's stage 1":
        model = ["--stage", "qformer", "--vision-tower", str(parts / "vision"), "--qformer-init", str(parts / "bert")]
    else:
        model = ["--stage", "align", "--family", "llava", "--vision-tower", str(parts / "vision"),
                 "--language-model", str(parts / "lm")]
    argv = ["train", *model, "--data", str(tmp_path / "data.json"), "--image-folder", str(tmp_path / "images"),
            "--output-dir", str(out), "--max-steps", "2"]
    if how != "model reads no video":
        argv += ["--num-frames", str(FRAMES)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(message, err[-1]) and err[-1].startswith("vlm-fusion: error: train: "), err[-1]
    assert not any("error" in line.lower() or "Traceback" in line for line in err[:-1])
    assert not any("Loading weights" in line for line in err)  # found before any model is loaded
    assert not out.exists()


@pytest.mark.parametrize("family,stage,bridge", [("llava", "instruct", {"video_pooling": "average"}),
                                                 ("blip2", "instruct", {"video_bridge": "video_qformer"}),
                                                 ("flamingo", "flamingo", {})])
def test_an_image_checkpoint_given_num_frames_gets_a_video_path_that_leaves_its_images_alone(parts, family, stage,
                                                                                             bridge, tmp_path, caplog):
    """LLaVA-NeXT-Video's start: an image model trained on clips with `--num-frames` (and the video path's fields
    through `--bridge`); the model it starts from answers images exactly as the image checkpoint does."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_fusion_cli import main

    images_only = tmp_path / "images_only"
    assert main(["train", "--stage", "align", "--family", family, "--vision-tower", str(parts / "vision"),
                 "--language-model", str(parts / "lm"), "--data", str(parts / "captions.json"), "--image-folder",
                 str(parts / "images"), "--output-dir", str(images_only), "--max-steps", "1",
                 *[a for k, v in BRIDGES[family].items() for a in ("--bridge", f"{k}={v}")]]) == 0
    model, processor = load_generation_model(TrainOptions(
        data=str(parts / "mixed.json"), image_folder=str(parts / "images"), output_dir=str(tmp_path / "out"),
        stage=stage, model=str(images_only), bridge=bridge, num_frames=FRAMES))
    assert model.config.video_token_id == processor.video_token_id != model.config.image_token_id
    assert all(getattr(model.config, k) == v for k, v in bridge.items())
    image_model = AutoModelForImageTextToText.from_pretrained(images_only).eval()
    image_processor = AutoProcessor.from_pretrained(images_only)
    text = ["USER: <image>\nwhat colour is the square ?\nASSISTANT:"]
    expected = image_processor(images=[random_image(0)], text=text, return_tensors="pt")
    inputs = processor(images=[random_image(0)], text=text, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
        reference = image_model(**expected).logits
    torch.testing.assert_close(logits[..., : reference.shape[-1]], reference, rtol=0, atol=0)

    caplog.clear()
    assert main(["train", "--stage", stage, "--model", str(images_only), "--data", str(parts / "mixed.json"),
                 "--image-folder", str(parts / "images"), "--output-dir", str(tmp_path / "out"), "--max-steps", "2",
                 "--num-frames", str(FRAMES), *[a for k, v in bridge.items() for a in ("--bridge", f"{k}={v}")]]) == 0
    assert re.search(r"--num-frames: .*images_only reads images only; its video path is added", caplog.text)
    trained = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    inputs = processor(videos=[str(parts / "images" / "clips" / "0000.mp4")], return_tensors="pt",
                       text=["USER: <video>\nwhich way does the square move ?\nASSISTANT:"])
    assert inputs["pixel_values_videos"].shape[:2] == (1, FRAMES)
    with torch.no_grad():
        out = trained.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


IMAGE_ONLY_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() + ': ' }}{% if m['content'] is string %}"
                       "{{ m['content'] }}{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n"
                       "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
                       "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def test_a_chat_template_that_drops_clips_is_refused_when_the_video_path_is_added(parts, tmp_path, capsys):
    """An image checkpoint whose template knows image parts only: its video path would train (the data's clips are
    marked in text) and then lose every clip of a chat, so `--num-frames` refuses it in one line, nothing written;
    `--chat-template` with a video part mends it, and the saved processor's chat renders the clip."""
    from transformers import AutoProcessor

    from vlm_fusion_cli import main

    images_only = tmp_path / "images_only"
    assert main(["train", "--stage", "align", "--family", "llava", "--vision-tower", str(parts / "vision"),
                 "--language-model", str(parts / "lm"), "--data", str(parts / "captions.json"), "--image-folder",
                 str(parts / "images"), "--output-dir", str(images_only), "--max-steps", "1",
                 "--chat-template", IMAGE_ONLY_TEMPLATE]) == 0
    capsys.readouterr()
    video = ["train", "--stage", "instruct", "--model", str(images_only), "--data", str(parts / "mixed.json"),
             "--image-folder", str(parts / "images"), "--output-dir", str(tmp_path / "out"), "--max-steps", "1",
             "--num-frames", str(FRAMES)]
    assert main(video) == 2
    err = capsys.readouterr().err.splitlines()
    assert re.search(r"the chat template of .*images_only renders an image part as <image> but drops a video part "
                     r".*give --chat-template", err[-1])
    assert not (tmp_path / "out").exists()

    template = IMAGE_ONLY_TEMPLATE.replace("{% elif p['type'] == 'text' %}",
                                           "{% elif p['type'] == 'video' %}<video>\n{% elif p['type'] == 'text' %}")
    assert main([*video, "--chat-template", template]) == 0
    chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "which way ?"}]}]
    rendered = AutoProcessor.from_pretrained(tmp_path / "out").apply_chat_template(chat)
    assert rendered.rstrip() == "USER: <video>\nwhich way ?"


def test_num_frames_beyond_what_a_checkpoint_embeds_is_one_line(parts, tmp_path, capsys):
    from vlm_fusion_cli import main

    # a Flamingo-style checkpoint embeds as many frames as it was composed for
    assert main(["train", "--stage", "align", "--family", "flamingo", "--vision-tower", str(parts / "vision"),
                 "--language-model", str(parts / "lm"), "--data", str(parts / "videos.json"), "--image-folder",
                 str(parts / "images"), "--output-dir", str(tmp_path / "flamingo"), "--max-steps", "1",
                 "--num-frames", "4", *[a for k, v in BRIDGES["flamingo"].items() for a in ("--bridge", f"{k}={v}")]]) == 0
    capsys.readouterr()
    assert main(["train", "--stage", "flamingo", "--model", str(tmp_path / "flamingo"), "--data",
                 str(parts / "videos.json"), "--image-folder", str(parts / "images"), "--output-dir",
                 str(tmp_path / "out"), "--max-steps", "1", "--num-frames", "6"]) == 2
    assert re.search(r"--num-frames 6: .*flamingo embeds at most 4 frames", capsys.readouterr().err.splitlines()[-1])


def test_a_killed_run_on_clips_resumes_to_the_weights_of_an_uninterrupted_one(parts, tmp_path):
    import subprocess
    import sys

    from vlm_fusion_cli import main

    def argv(out):
        return ["--stage", "instruct", "--family", "llava", "--vision-tower", str(parts / "vision"),
                "--language-model", str(parts / "lm"), "--data", str(parts / "mixed.json"), "--image-folder",
                str(parts / "images"), "--num-frames", str(FRAMES), "--output-dir", str(out), "--batch-size", "2",
                "--max-steps", "6", "--save-steps", "2", "--logging-steps", "1", "--bridge-lr", "1e-3"]

    assert main(["train", *argv(tmp_path / "whole")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same reductions, bit for bit
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, "SIGTERM", "3", *argv(tmp_path / "run")],
                            capture_output=True, text=True, timeout=600, env=env)
    assert killed.returncode == 143, killed.stderr[-2000:]
    assert main(["train", *argv(tmp_path / "run"), "--resume"]) == 0
    resumed, reference = load_file(tmp_path / "run" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)


@pytest.mark.parametrize("family,video", [("fusion_blip2", dict(video_bridge="video_qformer", num_video_query_tokens=4,
                                                                          qformer_dropout=0.0)),
                                          ("fusion_flamingo", {})])
def test_a_training_step_without_a_clip_runs_the_video_path_at_zero_gradient(family, video):
    """What two processes need when one holds a clip and the other none (DDP reduces every parameter's gradient;
    FSDP gathers every parameter on each process: test_training_distributed runs it): an image-only or text-only
    step gives the video path's own parameters (BLIP-2's video Q-Former, Flamingo's frame embeddings) a gradient,
    exactly 0, and leaves the loss as it is."""
    from vlm_fusion.tools.tiny import tiny_model_and_processor

    model, processor = tiny_model_and_processor(family, video=True, num_frames=FRAMES, **video)
    own = [name for name, _ in model.named_parameters() if "video" in name or "frame" in name]
    assert own
    for inputs in (processor(images=[random_image(0)], text=["<image> a red square"], return_tensors="pt"),
                   processor(text=["a red square"], return_tensors="pt")):
        labels = inputs["input_ids"].masked_fill(inputs["input_ids"] >= model.config.text_config.vocab_size, -100)
        with torch.no_grad():
            expected = model.eval()(**inputs, labels=labels).loss
        model.train().zero_grad()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        assert loss.item() == expected.item()
        grads = dict(model.named_parameters())
        assert all(grads[name].grad is not None and not grads[name].grad.any() for name in own)


def write_clip_shards(parts, folder, broken=False) -> str:
    """The video files of `videos.json` (its even samples) as WebVid-style shards, two clips each: `KEY.mp4` +
    `KEY.txt`; `broken` adds a clip that is not a video and one with too few frames. Returns the brace pattern."""
    import io
    import tarfile

    rows = [row for row in json.loads((parts / "videos.json").read_text()) if row["video"].endswith(".mp4")]
    folder.mkdir(parents=True, exist_ok=True)
    extras = [("000000100", b"not a video"), ("000000101", None)] if broken else []
    for n in range(2):
        with tarfile.open(folder / f"{n:05d}.tar", "w") as tar:
            samples = [(f"{2 * n + i:09d}", rows[2 * n + i]) for i in range(2)]
            for key, payload in ([extras[n]] if broken else []) + [
                    (key, (parts / "images" / row["video"]).read_bytes()) for key, row in samples]:
                if payload is None:  # a clip of 2 frames
                    write_clip(folder / "short.mp4", frames=2, size=(32, 32))
                    payload = (folder / "short.mp4").read_bytes()
                caption = next((r["conversations"][1]["value"] for k, r in samples if k == key), "a broken one")
                for name, data in ((f"{key}.mp4", payload), (f"{key}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / "{00000..00001}.tar")


def test_streamed_clip_shards_give_the_batches_of_the_same_clips_in_llava_json(parts, tmp_path):
    from vlm_fusion.training.conversations import ConversationDataset, batch_collator, prepare_data
    from vlm_fusion.training.generation import AlignItems
    from vlm_fusion.training.streaming import pass_order

    run = options(parts, tmp_path / "out", data=write_clip_shards(parts, tmp_path / "shards"))
    model, processor = load_generation_model(run)
    collator = batch_collator(model, processor)
    streamed = streamed_batches(run, AlignItems(processor, "plain", "\n", run.max_length), collator, count=4, batch=2)
    rows = [row for row in json.loads((parts / "videos.json").read_text()) if row["video"].endswith(".mp4")]
    (tmp_path / "clips.json").write_text(json.dumps(rows))
    prepared, kept, _ = prepare_data(options(parts, tmp_path / "out", data=str(tmp_path / "clips.json"),
                                             data_cache=str(tmp_path / "cache")), processor, "plain",
                                     str(tmp_path / "clips.json"))
    dataset = ConversationDataset(processor, prepared, kept)
    order = [2 * shard + i for shard in pass_order(2, 0, 0) for i in range(2)]
    assert_equal_batches(streamed, [collator([dataset[i] for i in order[b: b + 2]]) for b in (0, 2)])


def test_a_streamed_clip_is_decoded_to_the_frames_the_processor_samples_from_its_file(tmp_path):
    """A shard's clip gives the frames the video processor picks from the same file (the same pixels), not every
    frame held at once; where the container records no frame count (MKV), every frame, and the processor samples."""
    from vlm_fusion.processing_video import FusionVideoProcessor
    from vlm_fusion.tools.tiny import tiny_image_processor
    from vlm_fusion.training.streaming import Clip, decode_clip

    processor = FusionVideoProcessor.from_image_processor(tiny_image_processor(32), num_frames=FRAMES)
    written = write_clip(tmp_path / "long.mp4", frames=30)
    sampled = decode_clip(Clip((tmp_path / "long.mp4").read_bytes()), FRAMES)
    assert sampled.shape[0] == FRAMES
    assert np.array_equal(sampled, processor.decode(str(tmp_path / "long.mp4"), sample=True))
    assert np.array_equal(decode_clip(Clip((tmp_path / "long.mp4").read_bytes()))[[0, 7, 15, 22]], sampled)
    write_clip(tmp_path / "long.mkv", frames=len(written))
    every = decode_clip(Clip((tmp_path / "long.mkv").read_bytes()), FRAMES)
    assert every.shape[0] == len(written)
    assert np.array_equal(processor.clip_frames(every, 0, sample=True), processor.decode(str(tmp_path / "long.mkv"),
                                                                                          sample=True))


def test_broken_and_short_clips_in_shards_are_counted_and_skipped(parts, tmp_path):
    summary = train(options(parts, tmp_path / "out", data=write_clip_shards(parts, tmp_path / "shards", broken=True),
                            max_steps=2, batch_size=2))
    assert summary["samples_broken"]["unreadable clip"] == 1 and summary["samples_broken"]["short clip"] == 1
