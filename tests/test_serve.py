"""`vlm-fusion serve`, transformers' own OpenAI-compatible server with our families known to it: each shipped demo
model, started by the README's command, answers the demo question over HTTP (the OpenAI chat API, the image as a base64
data URL), streamed or not, as `vlm-fusion generate` does; a bad request gets HTTP 400 and the server goes on."""

import base64
import contextlib
import io
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("fastapi")  # transformers' serving extras: pip install "transformers[serving]"
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from conftest import ROOT, slow_except  # noqa: E402
from vlm_fusion.demo import MODELS, checkpoint, shapes  # noqa: E402
from vlm_fusion_cli import main  # noqa: E402
from vlm_fusion_cli.generate import build_prompt  # noqa: E402

QUESTION = "what colour is the square ?"  # the demo models' card question, about the scene of seed 1
MAX_NEW_TOKENS = 30  # `vlm-fusion generate`'s default, given to both sides


def readme_serve_command() -> list[str]:
    """The README's `vlm-fusion serve demo:llava ...` line, as words (comment dropped)."""
    section = (ROOT / "README.md").read_text().split("## Serve with transformers")[1].split("\n## ")[0]
    commands = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    line, = [line for line in commands.splitlines() if line.startswith("vlm-fusion serve demo:llava ")]
    return line.split("#")[0].split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """The demo scene (a green square, a yellow star) as a PNG file and its bytes."""
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    shapes.render(shapes.sample_scene(np.random.default_rng(1))).save(path)
    return path, path.read_bytes()


@pytest.fixture(scope="module", params=MODELS)
def server(tmp_path_factory, request):
    """The README's command with demo model `family` on a free port of 127.0.0.1 (one server at a time); yields an
    OpenAI client, the served model's name (its folder, as the server was given it: transformers 5.19's GET /v1/models
    lists the Hub cache only) and the server's log. From transformers 5.25 the model loads in a process the server
    spawns, where only `FusionModelLoader` brings the families in."""
    family = request.param
    words = readme_serve_command()
    words = [f"demo:{family}" if w == "demo:llava" else w for w in words]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serving(words, log) as client:
        yield family, client, checkpoint(family), log


@contextlib.contextmanager
def serving(words: list[str], log):
    """`words` (`vlm-fusion serve MODEL --port ...`) run on a free port, its output in `log`, until it answers
    /health; yields an OpenAI client for it and stops it after."""
    port = free_port()
    words = list(words)
    words[words.index("--port") + 1] = str(port)
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "vlm_fusion_cli", *words[1:]], stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the server did not start: {log.read_text()[-3000:]}")
                time.sleep(1)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        process.terminate()
        process.wait(timeout=60)


GENERATED = {}  # (family, question) -> what `vlm-fusion generate` printed


def generated(family, scene, capsys, question=QUESTION) -> str:
    """What `vlm-fusion generate` prints for `question` about the scene (run once per family and question)."""
    if (family, question) not in GENERATED:
        capsys.readouterr()
        assert main(["generate", "--model", f"demo:{family}", "--image", str(scene[0]), "--prompt", question,
                         "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0
        GENERATED[family, question] = capsys.readouterr().out.strip()
    return GENERATED[family, question]


def prompt_tokens(family, scene, question) -> int:
    """The length of the prompt `vlm-fusion generate` hands `model.generate` (visual placeholders included)."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint(family))
    prompt = build_prompt(processor, question, raw=False)
    image = Image.open(scene[0]).convert("RGB")
    return processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]


def ask(client, model, image_url, question=QUESTION, stream=False):
    """The server's answer (and, not streamed, its usage) to `question` about the image at `image_url`."""
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                             {"type": "text", "text": question}]}]
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                           max_tokens=MAX_NEW_TOKENS, stream=stream)
    if stream:
        return "".join(chunk.choices[0].delta.content or "" for chunk in reply if chunk.choices).strip()
    return reply.choices[0].message.content.strip(), reply.usage


@pytest.mark.parametrize("question", [QUESTION, shapes.CAPTION_QUESTION])
def test_the_openai_api_answers_as_vlm_fusion_generate_does(server, scene, capsys, question):
    """The demo question (one word) and the caption (a sentence), streamed and not; the prompt is the one `generate`
    builds (the same length, visual placeholders included)."""
    family, client, model, _ = server
    (answer, usage), streamed = ask(client, model, data_url(scene[1]), question), \
        ask(client, model, data_url(scene[1]), question, stream=True)
    expected = generated(family, scene, capsys, question)
    print(f"demo:{family} {question!r}: served {answer!r}, streamed {streamed!r}; vlm-fusion generate {expected!r}")
    assert expected and answer == streamed == expected
    assert usage.prompt_tokens == prompt_tokens(family, scene, question)


def test_a_bad_request_gets_400_and_the_server_goes_on(server, scene, capsys):
    family, client, model, _ = server
    with pytest.raises(openai.BadRequestError, match="image"):
        ask(client, model, data_url(b"this is not a png"))
    assert ask(client, model, data_url(scene[1]))[0] == generated(family, scene, capsys)  # still serving


def test_the_banner_says_how_requests_name_the_model(server):
    family, client, model, log = server
    banner, = [line for line in log.read_text().splitlines() if line.startswith("vlm-fusion serve: ")]
    assert banner.endswith(f"requests name the model as {model!r} (the OpenAI API's `model` field)")


def test_continuous_batching_is_refused_in_one_line(capsys):
    """transformers' server batches continuously only text-only models: its manager takes token ids, no images."""
    assert main(["serve", "demo:flamingo", "--continuous-batching"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "text-only models" in err


# ---- clips: OpenAI-style `video_url` parts ------------------------------------------------------------------------
# transformers' server keeps a `video_url` part as `{"type": "video", "url": URL}` and its `apply_chat_template`
# hands the URL, as given, to the processor's `videos=`; `vlm-fusion serve` leaves the frame count to the checkpoint.
VIDEO_QUESTION = "what colour is the square ?"
# One family served with clips in the default run: the server reads a clip the same way for every family, and each
# family's video path is checked against transformers in test_video_* (the others: -m slow).
VIDEO_FAMILIES = slow_except("fusion_llava", ["fusion_llava", "fusion_blip2", "fusion_flamingo"])


def write_clip(path, frames: int = 12, seed: int = 0):
    from test_video import write_clip as write  # PyAV: random-coloured frames

    write(path, frames, seed=seed)
    return path


@pytest.fixture(scope="module", params=VIDEO_FAMILIES)
def video_server(tmp_path_factory, request):
    """A tiny random video model of each family (4 frames a clip), saved, served by the README's command on a free
    port; yields the family, an OpenAI client, the served model's name (its folder) and a clip of 12 frames."""
    from vlm_fusion.tools.tiny import tiny_model_and_processor

    family = request.param
    folder = tmp_path_factory.mktemp(f"video-{family}")
    model, processor = tiny_model_and_processor(family, video=True, num_frames=4)
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    clip = write_clip(folder / "clip.mp4")
    words = [str(folder / "model") if w == "demo:llava" else w for w in readme_serve_command()]
    with serving(words, folder / "server.log") as client:
        yield family, client, str(folder / "model"), clip


def generated_about_clip(model: str, clip, capsys, num_frames=None) -> str:
    """What `vlm-fusion generate --video` prints about `clip` (the checkpoint's frame count unless `num_frames`)."""
    capsys.readouterr()
    assert main(["generate", "--model", model, "--video", str(clip), "--prompt", VIDEO_QUESTION,
                     "--max-new-tokens", str(MAX_NEW_TOKENS),
                     *(["--num-frames", str(num_frames)] if num_frames else [])]) == 0
    return capsys.readouterr().out.strip()


def ask_about_clip(client, model, video_url, stream=False, **extra):
    """The server's answer (and, not streamed, its usage) to the question about the clip at `video_url`."""
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_url}},
                                             {"type": "text", "text": VIDEO_QUESTION}]}]
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=MAX_NEW_TOKENS,
                                           stream=stream, extra_body=extra or None)
    if stream:
        return "".join(chunk.choices[0].delta.content or "" for chunk in reply if chunk.choices).strip()
    return reply.choices[0].message.content.strip(), reply.usage


def video_data_url(path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def test_a_clip_is_answered_as_vlm_fusion_generate_video_does(video_server, capsys):
    """The clip as a base64 data URL (streamed and not), a local path and a file URL: the same answer as `generate
    --video` on the saved model, from the same prompt (its length: the checkpoint's 4 frames, not the server's 32)."""
    from transformers import AutoProcessor

    family, client, model, clip = video_server
    expected = generated_about_clip(model, clip, capsys)
    answer, usage = ask_about_clip(client, model, video_data_url(clip))
    streamed = ask_about_clip(client, model, video_data_url(clip), stream=True)
    by_path, _ = ask_about_clip(client, model, str(clip))
    by_file_url, _ = ask_about_clip(client, model, clip.as_uri())
    print(f"{family}: served {answer!r}, streamed {streamed!r}, by path {by_path!r}, by file URL {by_file_url!r}; "
          f"vlm-fusion generate --video {expected!r}")
    assert expected and answer == streamed == by_path == by_file_url == expected
    processor = AutoProcessor.from_pretrained(model)
    prompt = build_prompt(processor, VIDEO_QUESTION, raw=False, images=0, videos=1)
    assert usage.prompt_tokens == processor(videos=[str(clip)], text=[prompt], return_tensors="pt")["input_ids"].shape[1]


def test_a_video_request_chooses_the_frame_count_as_generate_num_frames_does(video_server, capsys):
    """`chat_template_kwargs: {"num_frames": 2}` in the request samples as `generate --num-frames 2`."""
    family, client, model, clip = video_server
    answer, usage = ask_about_clip(client, model, video_data_url(clip), chat_template_kwargs={"num_frames": 2})
    _, usage_default = ask_about_clip(client, model, video_data_url(clip))
    assert answer == generated_about_clip(model, clip, capsys, num_frames=2)
    if family != "fusion_flamingo":  # Flamingo's clip is one media position whatever its frames
        assert usage.prompt_tokens < usage_default.prompt_tokens


def test_a_bad_video_clip_gets_400_in_one_line_and_the_server_goes_on(video_server, capsys, tmp_path):
    """Not a video, fewer frames than the checkpoint samples, no such file: HTTP 400 with the processor's reason."""
    family, client, model, clip = video_server
    short = write_clip(tmp_path / "short.mp4", frames=2)
    for url, reason in [("data:video/mp4;base64," + base64.b64encode(b"this is not a video").decode(),
                         "not a video PyAV can read"),
                        (video_data_url(short), "fewer than num_frames=4"),
                        (str(tmp_path / "missing.mp4"), "No video file")]:
        with pytest.raises(openai.BadRequestError) as refused:
            ask_about_clip(client, model, url)
        message = refused.value.body["message"]
        assert reason in message and "\n" not in message
    assert ask_about_clip(client, model, video_data_url(clip))[0] == generated_about_clip(model, clip, capsys)


def test_a_clip_to_a_demo_model_is_answered_as_vlm_fusion_generate_video_does(server, tmp_path, capsys):
    """The demo models read clips (the demo's video stage): the served answer is `generate --video`'s."""
    family, client, model, _ = server
    clip = write_clip(tmp_path / "clip.mp4")
    assert ask_about_clip(client, model, video_data_url(clip))[0] == generated_about_clip(model, clip, capsys)


def test_a_video_to_a_model_that_reads_none_gets_400(tmp_path):
    """A model that reads images only: a clip is refused in one line, not dropped."""
    from vlm_fusion.tools.tiny import tiny_model_and_processor

    model, processor = tiny_model_and_processor("fusion_llava")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    words = [str(tmp_path / "model") if w == "demo:llava" else w for w in readme_serve_command()]
    with serving(words, tmp_path / "server.log") as client:
        with pytest.raises(openai.BadRequestError, match="no video processor"):
            ask_about_clip(client, str(tmp_path / "model"), video_data_url(write_clip(tmp_path / "clip.mp4")))


def test_video_frames_default_to_the_checkpoint_s_beside_your_chat_template_kwargs():
    """`vlm-fusion serve` puts `"num_frames": null` among the server's template arguments, keeping yours."""
    import json

    from vlm_fusion.integrations.transformers_serve import with_checkpoint_frames

    assert with_checkpoint_frames(["--port", "1"]) == ["--port", "1", "--chat-template-kwargs", '{"num_frames": null}']
    merged = with_checkpoint_frames(["--chat-template-kwargs", '{"enable_thinking": true}'])
    assert json.loads(merged[1]) == {"num_frames": None, "enable_thinking": True}
    merged = with_checkpoint_frames(['--chat-template-kwargs={"fps": 1}'])
    assert json.loads(merged[0].split("=", 1)[1]) == {"num_frames": None, "fps": 1}
    yours = ["--chat-template-kwargs", '{"num_frames": 8}']
    assert with_checkpoint_frames(yours) == yours
