"""The `vlm-fusion` command and the shipped demo checkpoints."""

import importlib.resources
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from transformers import AutoConfig

from vlm_fusion.demo import shapes
from vlm_fusion.tools.tiny import tiny_model_and_processor
from vlm_fusion_cli import main
from vlm_fusion_cli.common import FAMILY_NAMES, missing_model

CHECKPOINTS = importlib.resources.files("vlm_fusion.demo") / "checkpoints"


# ---- tokens: the seeds' budget calculator --------------------------------------------------------------------
def test_tokens_match_the_seeds_worked_examples(capsys):
    assert main(["tokens", "--image-size", "224", "--patch-size", "14", "--family", "llava"]) == 0
    assert " 256 LM tokens per image" in capsys.readouterr().out  # 224px: 16x16 = 256 tokens
    assert main(["tokens", "--image-size", "336", "--patch-size", "14", "--tiles", "4", "--thumbnail"]) == 0
    out = capsys.readouterr().out
    assert "2880 LM tokens per image  (70.3% of the context)" in out  # 4 tiles + thumbnail: 2880 tokens, 70% of 4K
    assert " 160 LM tokens" in out and "320 latents" in out  # BLIP-2: 5 crops x 32 queries; Flamingo: 5 x 64 latents


def test_tokens_rejects_an_image_smaller_than_a_patch(capsys):
    assert main(["tokens", "--image-size", "10", "--patch-size", "14"]) == 2
    assert "smaller than --patch-size" in capsys.readouterr().err


# ---- generate ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    model, processor = tiny_model_and_processor("fusion_llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    image = path / "image.png"
    shapes.render(shapes.sample_scene(np.random.default_rng(0))).save(image)
    return path, image


def test_generate_answers_about_an_image(saved_model, capsys):
    path, image = saved_model
    assert main(["generate", "--model", str(path), "--image", str(image), "--prompt", "what is shown ?",
                     "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.split()) >= 1


def test_generate_errors_are_clear(saved_model, tmp_path, capsys):
    path, image = saved_model
    assert main(["generate", "--model", str(path), "--image", str(tmp_path / "missing.png"), "--prompt", "x"]) == 2
    assert "no image file" in capsys.readouterr().err
    (tmp_path / "not_an_image.png").write_text("hello")
    assert main(["generate", "--model", str(path), "--image", str(tmp_path / "not_an_image.png"), "--prompt", "x"]) == 2
    assert "not a readable image" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--image", str(image), "--prompt", "x"]) == 2
    assert f"no model folder {tmp_path / 'nowhere'}" in capsys.readouterr().err


def test_convert_dispatches_to_the_converters(capsys):
    for source, flag in (("llava", "--vision-tower"), ("blip2", "--qformer-heads"), ("openflamingo", "--checkpoint"),
                         ("idefics", "--input")):
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", source, "--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and flag in out
        assert out.startswith(f"usage: vlm-fusion convert {source} ") and "conversion_scripts" not in out


# ---- the demo ---------------------------------------------------------------------------------------------------
def test_task_data_is_reproducible():
    a, b = shapes.examples(7, 12), shapes.examples(7, 12)
    assert [x[1:] for x in a] == [x[1:] for x in b]
    assert all(np.array_equal(np.asarray(x[0]), np.asarray(y[0])) for x, y in zip(a, b))


def test_task_answers_agree_with_the_drawn_geometry():
    """Left/right and the caption's order are checked against the shapes' drawn centres, not the grid bookkeeping."""
    rng = np.random.default_rng(11)
    column_of = lambda item: shapes.COLUMNS[int(item.cx // (shapes.IMAGE_SIZE / shapes.GRID))]  # noqa: E731
    seen = 0
    for _ in range(300):
        scene = shapes.sample_scene(rng)
        by_shape = {item.shape: item for item in scene}
        for kind, question, answer in shapes.questions(scene, rng):
            if kind == "left_of":
                a, b = (by_shape[word] for word in question.split() if word in shapes.SHAPES)
                assert answer == f"the {a.shape} is {column_of(a)} , the {b.shape} is {column_of(b)} , so " + (
                    "yes" if a.cx < b.cx else "no")
                seen += 1
        words = shapes.grid_text(scene).split()
        assert len(words) == shapes.GRID**2 and sum(word != "empty" for word in words) == len(scene)
        assert set(words) <= set(shapes.VOCABULARY)  # one token each for the tokenizer, never <unk>
        assert all(shapes.cell_word(item.colour, item.shape, column_of(item)) in words for item in scene)
        named = [word for word in shapes.caption(scene).split() if word in shapes.SHAPES]
        columns = [shapes.COLUMNS.index(column_of(by_shape[s])) for s in named] if len(by_shape) == len(scene) else []
        assert columns == sorted(columns)
    assert seen > 50


@pytest.mark.parametrize("family", ["llava", "blip2", "flamingo"])
def test_shipped_demo_checkpoint_answers_every_question_type(family):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_fusion.demo.train import evaluate

    path = str(CHECKPOINTS / family)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    accuracy = evaluate(model, AutoProcessor.from_pretrained(path), seed=999, per_kind=50)
    print(family, accuracy)
    assert min(accuracy["colour"], accuracy["shape"], accuracy["count"]) >= 0.95 and accuracy["left_of"] >= 0.85


@pytest.mark.slow  # 600 clips a family (half a minute each): .ci/run runs it
@pytest.mark.parametrize("family", ["llava", "blip2", "flamingo"])
def test_shipped_demo_checkpoint_scores_the_clips_as_its_card_says(family):
    """The card's clip table is what `evaluate_clips` measures on its held-out clips (seed 12345, 200 per type); a
    greedy answer on a near-tie may flip with another CPU's reduction order: one answer in 200 of slack."""
    import re

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_fusion.demo import clips
    from vlm_fusion.demo.train import evaluate_clips

    path = str(CHECKPOINTS / family)
    card = (CHECKPOINTS / family / "README.md").read_text()
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    accuracy = evaluate_clips(model, AutoProcessor.from_pretrained(path))
    print(family, accuracy)
    for kind in clips.TEMPORAL_TYPES:
        stated = float(re.search(rf"\| {kind} \| ([0-9.]+)% \|", card).group(1)) / 100
        assert abs(accuracy[kind] - stated) <= 1 / 200 + 1e-9, (kind, accuracy[kind], stated)


@pytest.mark.parametrize("family", ["llava", "blip2", "flamingo"])
def test_the_demo_prompt_is_what_the_models_chat_template_renders(family):
    """The demo asks (CLI, evaluation, the LM's text pretraining) in the text the recipe trained on: the chat
    template's rendering of a question about one image."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(CHECKPOINTS / family))
    question = "what colour is the star ?"
    as_trained = [{"role": "user", "content": f"<image>\n{question}"}]  # as LLaVA's JSON gives it to the recipe
    as_parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]  # lmms-eval, vLLM
    for messages in (as_trained, as_parts):
        assert processor.apply_chat_template(messages, add_generation_prompt=True) == shapes.PROMPT.format(
            question=question)
    from vlm_fusion.demo import clips  # and a clip's question, as the video stage trained on it

    question = "which shape appears last ?"
    for content in (f"<video>\n{question}", [{"type": "video"}, {"type": "text", "text": question}]):
        assert processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True) \
            == clips.PROMPT.format(question=question)


def test_demo_command_prints_questions_and_verdicts(capsys):
    assert main(["demo", "--family", "llava", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "Q: how many shapes are there ?" in out and ("-> right" in out or "-> WRONG, expected" in out)


def test_demo_command_asks_fresh_clips_and_saves_them(tmp_path, capsys):
    from vlm_fusion.demo import clips

    assert main(["demo", "--video", "--family", "llava", "--seed", "3", "--save-clips", str(tmp_path / "clip")]) == 0
    out = capsys.readouterr().out
    rng = np.random.default_rng(3)  # the clips of seed 3, one per temporal type, drawn as the command draws them
    for kind in clips.TEMPORAL_TYPES:
        clip, question, answer = clips.sample_clip(rng, kind)
        assert f"Q: {question}" in out
        with Image.open(tmp_path / f"clip_{kind}.gif") as gif:  # identical frames in a row are one, held longer
            assert gif.size == (4 * shapes.IMAGE_SIZE,) * 2
            durations = []
            for index in range(gif.n_frames):
                gif.seek(index)
                durations.append(gif.info["duration"])
            assert sum(durations) == 500 * clips.NUM_FRAMES
    assert out.count("-> right") + out.count("-> WRONG, expected") == len(clips.TEMPORAL_TYPES)


def test_demo_save_clips_without_video_is_one_line(capsys):
    assert main(["demo", "--save-clips", "clip"]) == 2
    assert "--save-clips saves the clips of --video" in capsys.readouterr().err


@pytest.mark.slow  # the demo's whole recipe, quick (2.5 minutes); `vlm-fusion train`'s stages run in the default suite
def test_training_script_runs(tmp_path, monkeypatch):
    from vlm_fusion.demo import train

    from vlm_fusion.demo import clips

    monkeypatch.setitem(train.STEPS, "clip_text", 40)  # the LM on the clips' text: 4 steps here (--quick)
    results = train.main(["--quick", "--families", "fusion_llava", "--out", str(tmp_path / "models"), "--parts",
                          str(tmp_path / "parts")])
    assert set(results["fusion_llava"]["images"]) == set(shapes.QUESTION_TYPES)
    assert set(results["fusion_llava"]["clips"]) == set(clips.TEMPORAL_TYPES)
    card = (tmp_path / "models" / "llava" / "README.md").read_text()
    assert "## Evaluation" in card and "| colour |" in card and "| blinks |" in card
    assert "Before it, the LM trained 4 steps of 64 on the clips written as text" in card
    for curve in ("loss.png", "loss_video.png"):  # each stage's loss curve, shipped with the card
        assert f"![training loss]({curve})" in card and (tmp_path / "models" / "llava" / curve).is_file()
    # --video-from: the video stage alone, from image models already trained
    shutil.copytree(tmp_path / "models" / "llava", tmp_path / "images" / "llava")
    again = train.main(["--quick", "--families", "fusion_llava", "--out", str(tmp_path / "again"), "--video-from",
                        str(tmp_path / "images")])
    assert set(again["fusion_llava"]["clips"]) == set(clips.TEMPORAL_TYPES)
    assert "## Training: the video stage" in (tmp_path / "again" / "llava" / "README.md").read_text()
    # --parts kept the pretrained parts: the next run uses them as they are, pretraining nothing
    for name in ("pretrain_vision", "pretrain_lm"):
        monkeypatch.setattr(train, name, lambda *a, **k: pytest.fail("pretrained again"))
    parts = train.pretrained_parts(str(tmp_path / "parts"), train.STEPS)
    assert parts == (str(tmp_path / "parts" / "vision"), str(tmp_path / "parts" / "lm"))
    assert AutoConfig.from_pretrained(parts[1]).model_type == "llama"


@pytest.mark.slow  # the BLIP-2-style route to time, quick, from the shipped model (a minute or two)
def test_the_blip2_route_to_time_runs_its_stages_once_a_work_folder(tmp_path, monkeypatch):
    """`--query-words`: the stages before BLIP-2's video stage (the LM on the clips as text, the tower on rows, the
    queries on words) run in turn, the card names them, and a second run in the same `--work` trains none again."""
    from vlm_fusion.demo import train

    monkeypatch.setitem(train.STEPS, "clip_text", 40)  # --quick: a tenth
    monkeypatch.setattr(train, "QUERY_WORDS_STEPS", {"rows": 40, "words": 100, "video": 500})  # --quick: a tenth
    shutil.copytree(CHECKPOINTS / "blip2", tmp_path / "images" / "blip2")
    argv = ["--quick", "--query-words", "--families", "fusion_blip2", "--video-from", str(tmp_path / "images"),
            "--work", str(tmp_path / "work")]
    train.main([*argv, "--out", str(tmp_path / "models")])
    card = (tmp_path / "models" / "blip2" / "README.md").read_text()
    assert "Before it, the LM trained 4 steps of 64 on the clips written as text" in card
    assert "then the tower trained 4 steps of 64 to name each patch's row" in card
    assert "then the Q-Former and projection trained 10 steps of 64 to write each image" in card
    monkeypatch.setattr(train, "minimise", lambda *a, **k: pytest.fail("trained again"))

    class VideoStage(Exception):
        pass

    def video_stage(options):  # the video stage itself runs again, into the folder the first run filled
        assert options.overwrite, "the second run's video stage would refuse its non-empty --output-dir"
        raise VideoStage(options.model)

    monkeypatch.setattr(train, "train_stage", video_stage)
    with pytest.raises(VideoStage, match="fusion_blip2_clip_text_4_rows_4_words_10"):
        train.main([*argv, "--out", str(tmp_path / "again")])


# ---- what a new user runs into ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_generate_with_a_demo_model_answers_through_its_chat_template(family, tmp_path, capsys):
    rng = np.random.default_rng(1)  # the scene `vlm-fusion demo --seed 1` draws and asks about
    scene = shapes.sample_scene(rng)
    shapes.render(scene).save(tmp_path / "scene.png")
    asked = shapes.questions(scene, rng)[:3]  # colour, shape, count
    answers = []
    for kind, question, truth in asked:
        assert main(["generate", "--model", f"demo:{family}", "--image", str(tmp_path / "scene.png"),
                         "--prompt", question]) == 0
        answers.append(capsys.readouterr().out.strip())
    print(f"demo:{family}: " + "; ".join(f"{q!r} -> {a!r}" for (_, q, _), a in zip(asked, answers)))
    assert answers == [truth for _, _, truth in asked]


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "demo:llava", "--image", "IMAGE", "--prompt", "x", "--max-new-tokens", "0"], "must be at least 1"),
    (["generate", "--model", "demo:llava", "--image", "IMAGE", "--prompt", "x", "--max-new-tokens", "-1"], "must be at least 1"),
    (["generate", "--model", "demo:llava", "--image", "IMAGE", "--prompt", " "], "--prompt is empty"),
    (["generate", "--model", "demo:llama", "--image", "IMAGE", "--prompt", "x"], "unknown demo model 'llama'"),
    (["generate", "--model", "demo:llava", "--image", "IMAGE", "--raw", "--prompt", "<image> <image> x"], "holds 2 <image>"),
    (["tokens", "--patch-size", "0"], "must be at least 1"),
    (["tokens", "--context", "0"], "must be at least 1"),
    (["tokens", "--tiles", "-3"], "must be at least 1"),
])
def test_bad_input_is_one_line(argv, message, saved_model, capsys):
    _, image = saved_model
    argv = [str(image) if a == "IMAGE" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith(("vlm-fusion", "usage"))]) >= 1


def test_a_corrupted_weights_file_is_named(saved_model, tmp_path, capsys):
    path, image = saved_model
    broken = shutil.copytree(path, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["generate", "--model", str(broken), "--image", str(image), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert f"{broken / 'model.safetensors'} is not a readable safetensors file" in err and len(err.splitlines()) == 1


def test_a_config_without_vision_config_is_refused_in_one_line(saved_model, tmp_path, capsys):
    import json

    path, image = saved_model
    broken = shutil.copytree(path, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    del config["vision_config"]
    (broken / "config.json").write_text(json.dumps(config))
    assert main(["generate", "--model", str(broken), "--image", str(image), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "has no `vision_config`" in err and len(err.splitlines()) == 1


MISSING_MODEL = {  # every command that takes a model, naming one that is not there
    "generate": ["generate", "--model", "{model}", "--image", "{image}", "--prompt", "x"],
    "explain": ["explain", "--model", "{model}", "--image", "{image}", "--prompt", "x", "--out", "{tmp}/out"],
    "serve": ["serve", "{model}", "--port", "8000"],
    "train": ["train", "--model", "{model}", "--data", "{tmp}/data.json", "--output-dir", "{tmp}/out"],
    "evaluate": ["evaluate", "retrieval", "--model", "{model}", "--data", "{tmp}/data.json"],
}


@pytest.mark.parametrize("model", ["my-model", "./models/my-model", "org/my-model"])
@pytest.mark.parametrize("command", sorted(MISSING_MODEL))
def test_a_missing_model_folder_is_one_line_within_a_second_offline(command, model, tmp_path):
    """The issue's case: `explain --model my-model` retried the Hub for 65 s and blamed the network; `./models/my-model`
    was "Repo id must be in the form ...". Offline, the answer says that no such folder exists, and for a name that
    could be a Hub id that the Hub cache does not hold it, before torch is imported."""
    import subprocess
    import sys
    import time

    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    argv = [w.format(model=model, image=image, tmp=tmp_path) for w in MISSING_MODEL[command]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "vlm_fusion_cli", *argv], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env=env)
    seconds = time.perf_counter() - start
    flag = "MODEL" if command == "serve" else "--model"
    assert done.returncode == 2 and done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"vlm-fusion: error: {flag}: no model folder {model} (nothing at "
                                  f"{tmp_path / model}), and ")
    assert ("is not a Hub id" if model.startswith(".") else "not in the Hub cache (HF_HUB_OFFLINE") in done.stderr
    assert seconds < 1.0, f"{seconds:.2f} s"


def test_a_model_in_the_hub_cache_passes_the_check_offline(tmp_path, monkeypatch):
    """Offline, a Hub id the Hub cache holds is not refused: transformers loads it from there."""
    snapshot = tmp_path / "hub" / "models--org--cached" / "snapshots" / "0123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert missing_model("org/cached") is None
    assert "not in the Hub cache" in missing_model("org/other")
    assert missing_model(str(snapshot / "config.json")).endswith(
        "is a file, not a model folder (a folder with config.json and the weights)")


def test_help_and_tokens_answer_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys, contextlib, io, vlm_fusion_cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert vlm_fusion_cli.main(['tokens']) == 0\n"
            "    try:\n        vlm_fusion_cli.main(['--help'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'vlm_fusion') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize("height, width", [(480, 640), (1000, 300), (336, 336)])
def test_tokens_counts_llava_next_images_as_transformers_does(height, width, capsys):
    """llava-v1.6's settings (336 px tiles, 14 px patches, its five grids) against LlavaNextProcessor's own count."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from vlm_fusion.tools.tiny import tiny_tokenizer

    grids = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    reference = LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(image_grid_pinpoints=grids),
                                   tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1)
    expected = reference._get_number_of_features(height, width, 336, 336) - 1  # "default" drops CLS
    assert main(["tokens", "--family", "llava", "--anyres", ",".join(f"{h}x{w}" for h, w in grids),
                     "--image", f"{height}x{width}"]) == 0
    out = capsys.readouterr().out
    print(f"{height}x{width}: ours {out.split('LM tokens')[0].split()[-1]}, transformers {expected}")
    assert f" {expected} LM tokens per image" in out


def test_the_command_line_knows_the_families_and_only_points_down():
    """`vlm_fusion_cli` keeps its own copy of the families' short names (to answer --help without importing vlm_fusion),
    and the arrows go one way: vlm_fusion_cli imports vlm_fusion, no module of vlm_fusion imports vlm_fusion_cli."""
    import pathlib
    import re

    import vlm_fusion
    from vlm_fusion.demo import MODELS

    assert FAMILY_NAMES == tuple(family.name for family in vlm_fusion.FAMILIES.values()) == MODELS
    root = pathlib.Path(vlm_fusion.__file__).parent
    upward = re.compile(r"^\s*(from|import)\s+vlm_fusion_cli\b", flags=re.M)
    assert [str(p.relative_to(root)) for p in sorted(root.rglob("*.py")) if upward.search(p.read_text())] == []
