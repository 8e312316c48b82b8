"""lmms-eval through its own command line (`lmms-eval --model vlm_fusion ...`) on the demo models and the shipped
shapes_vqa task: its scores equal the package's own evaluation of the same items, its per-item answers equal
`model.generate`'s. Runs where lmms-eval is installed (the `[eval]` extra; `.ci/run` builds that environment)."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lmms_eval")

from conftest import ROOT  # noqa: E402
from vlm_fusion.demo import checkpoint, shapes  # noqa: E402

EXAMPLE = ROOT / "examples" / "lmms_eval"
PER_KIND = 5


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The example task as shipped, its data written by the example's own script (5 questions per type)."""
    root = tmp_path_factory.mktemp("shapes_vqa")
    subprocess.run([sys.executable, str(EXAMPLE / "write_shapes_vqa.py"), "--out", str(root / "data"),
                    "--per-kind", str(PER_KIND)], check=True, capture_output=True)
    (root / "task").mkdir()
    shutil.copy(EXAMPLE / "utils.py", root / "task")
    yaml = (EXAMPLE / "shapes_vqa.yaml").read_text()
    (root / "task" / "shapes_vqa.yaml").write_text(yaml.replace("dataset_path: examples/lmms_eval/shapes_vqa_data",
                                                                f"dataset_path: {root / 'data'}"))
    return root


def lmms_eval(task, out, model_args: str, batch_size: int):
    """One run of lmms-eval's command line; its results and per-sample answers (it exits 0 even when it fails, so the
    files are what tells)."""
    command = [os.path.join(os.path.dirname(sys.executable), "lmms-eval"), "--model", "vlm_fusion", "--model_args",
               model_args, "--tasks", "shapes_vqa", "--include_path", str(task / "task"), "--batch_size",
               str(batch_size), "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    results = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    samples = glob.glob(str(out / "**" / "*_samples_shapes_vqa.jsonl"), recursive=True)
    return done, (json.load(open(results[0])) if results else None), \
        ([json.loads(line) for line in open(samples[0])] if samples else None)


def direct_answers(path, trust_remote_code=False):
    """The package's own answers: each question through the model's chat template, processor and `generate`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=trust_remote_code).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    nested = model.config.model_type == "fusion_flamingo"
    answers = []
    for image, kind, question, truth in shapes.examples(12345, PER_KIND * len(shapes.QUESTION_TYPES)):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[[image]] if nested else [image], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        answers.append((kind, processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True), truth))
    return answers


def answers_of(samples) -> list[str]:
    """Each document's answer, in document order, from lmms-eval's samples file."""
    responses = [sample["filtered_resps"] for sample in sorted(samples, key=lambda s: s["doc_id"])]
    return [r if isinstance(r, str) else r[0] for r in responses]


def scores(answers) -> dict:
    per_kind = {kind: [a.strip() == t for k, a, t in answers if k == kind] for kind in shapes.QUESTION_TYPES}
    return {"exact_match": sum(a.strip() == t for _, a, t in answers) / len(answers),
            **{kind: sum(v) / len(v) for kind, v in per_kind.items()}}


@pytest.mark.parametrize("family", ["llava", "blip2", "flamingo"])
def test_lmms_eval_scores_and_answers_equal_the_packages_own(task, tmp_path, family):
    expected = direct_answers(checkpoint(family))
    for batch_size in (1, 4):
        done, results, samples = lmms_eval(task, tmp_path / f"b{batch_size}", f"pretrained={checkpoint(family)}",
                                           batch_size)
        assert results is not None, done.stdout[-3000:] + done.stderr[-3000:]
        metrics = results["results"]["shapes_vqa"]
        got = {name: metrics[f"{name},none"] for name in ("exact_match", *shapes.QUESTION_TYPES)}
        print(f"{family}, batch {batch_size}: lmms-eval {got}")
        assert got == pytest.approx(scores(expected))
        assert answers_of(samples) == [answer for _, answer, _ in expected]


def test_a_remote_code_export_is_evaluated_the_same_way(task, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    exported = tmp_path / "exported"
    AutoModelForImageTextToText.from_pretrained(checkpoint("llava")).save_pretrained(exported, remote_code=True)
    AutoProcessor.from_pretrained(checkpoint("llava")).save_pretrained(exported, remote_code=True)
    done, results, samples = lmms_eval(task, tmp_path / "out", f"pretrained={exported},trust_remote_code=True", 4)
    assert results is not None, done.stdout[-3000:] + done.stderr[-3000:]
    assert answers_of(samples) == [answer for _, answer, _ in direct_answers(checkpoint("llava"))]


def test_a_folder_that_is_not_a_vlm_fusion_model_is_named_in_one_line(task, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlm_fusion.tools.tiny import tiny_text_config

    AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_text_config("llama"))).save_pretrained(tmp_path / "lm")
    done, results, _ = lmms_eval(task, tmp_path / "out", f"pretrained={tmp_path / 'lm'}", 1)
    assert results is None  # lmms-eval exits 0 all the same
    message = f"pretrained={tmp_path / 'lm'} is not a vlm-fusion model: its config.json is a 'llama' model"
    assert message in done.stdout + done.stderr


# ---- clips: a local video task ------------------------------------------------------------------------------------
CLIP_QUESTIONS = ["what colour is the square ?", "where is the circle ?", "how many shapes are there ?"]
CLIP_TASK_YAML = """task: clips_qa
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function clips_utils.doc_to_visual
doc_to_text: !function clips_utils.doc_to_text
doc_to_messages: !function clips_utils.doc_to_messages
doc_to_target: answer
process_results: !function clips_utils.process_results
generation_kwargs:
  max_new_tokens: 16
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
CLIP_TASK_UTILS = '''
def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_messages(doc, lmms_eval_specific_kwargs=None):
    """lmms-eval's ChatMessages: the clip as a {"type": "video", "url": path} part, then the question."""
    return [{"role": "user", "content": [{"type": "video", "url": doc["video"]},
                                         {"type": "text", "text": doc["question"]}]}]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
'''


@pytest.fixture(scope="module")
def clip_task(tmp_path_factory):
    """A local lmms-eval task of three clips (6, 9 and 12 frames, written with PyAV), one question each."""
    import datasets
    from test_video import write_clip

    root = tmp_path_factory.mktemp("clips_qa")
    paths = [str(root / f"clip{i}.mp4") for i in range(3)]
    for i, (path, frames) in enumerate(zip(paths, (6, 9, 12))):
        write_clip(path, frames, seed=i)
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"video": paths, "question": CLIP_QUESTIONS, "answer": ["red", "left", "two"]})}).save_to_disk(root / "data")
    (root / "task").mkdir()
    (root / "task" / "clips_qa.yaml").write_text(CLIP_TASK_YAML.format(data=root / "data"))
    (root / "task" / "clips_utils.py").write_text(CLIP_TASK_UTILS)
    return root, paths


@pytest.fixture(scope="module", params=["fusion_llava", "fusion_blip2", "fusion_flamingo"])
def video_model(tmp_path_factory, request):
    """A tiny random video model of each family (4 frames a clip), saved."""
    from vlm_fusion.tools.tiny import tiny_model_and_processor

    path = tmp_path_factory.mktemp(f"video-{request.param}")
    model, processor = tiny_model_and_processor(request.param, video=True, num_frames=4)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def run_clip_task(clip_task, out, model_args: str, batch_size: int):
    command = [os.path.join(os.path.dirname(sys.executable), "lmms-eval"), "--model", "vlm_fusion", "--model_args",
               model_args, "--tasks", "clips_qa", "--include_path", str(clip_task[0] / "task"), "--batch_size",
               str(batch_size), "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    results = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    samples = glob.glob(str(out / "**" / "*_samples_clips_qa.jsonl"), recursive=True)
    return done, (json.load(open(results[0])) if results else None), \
        ([json.loads(line) for line in open(samples[0])] if samples else None)


def direct_clip_answers(path, clips) -> list[str]:
    """`model.generate` on each clip and its question, through the model's chat template and processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    answers = []
    for clip, question in zip(clips, CLIP_QUESTIONS):
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(videos=[clip], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        answers.append(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def test_lmms_eval_video_answers_equal_model_generate(clip_task, video_model, tmp_path):
    """lmms-eval's command line on a local clip task: its per-item answers equal `model.generate`'s on the same saved
    model and clips, one at a time and batched (left-padded, the clips flat in order)."""
    expected = direct_clip_answers(video_model, clip_task[1])
    for batch_size in (1, 3):
        done, results, samples = run_clip_task(clip_task, tmp_path / f"b{batch_size}", f"pretrained={video_model}",
                                               batch_size)
        assert results is not None, done.stdout[-3000:] + done.stderr[-3000:]
        print(f"{video_model.name}, batch {batch_size}: lmms-eval {answers_of(samples)}; generate {expected}")
        assert answers_of(samples) == expected


def test_lmms_eval_video_task_on_a_model_that_reads_none_is_refused_in_one_line(clip_task, tmp_path):
    from vlm_fusion.tools.tiny import tiny_model_and_processor

    # the demo models read clips since their video stage: a tiny model that does not
    images_only = tmp_path / "images_only"
    model, processor = tiny_model_and_processor("fusion_llava")
    model.save_pretrained(images_only)
    processor.save_pretrained(images_only)
    done, results, _ = run_clip_task(clip_task, tmp_path / "out", f"pretrained={images_only}", 1)
    assert results is None  # lmms-eval exits 0 all the same
    assert f"vlm_fusion: the task gives clips, and {images_only} reads none" in done.stdout + done.stderr


def test_lmms_eval_video_stretch_of_a_clip_is_refused_in_one_line(clip_task, tmp_path):
    """A part's start_time / end_time would be dropped by the processor, which samples the whole clip: refused."""
    from lmms_eval.protocol import ChatMessages

    from vlm_fusion.integrations.lmms_eval_model import VLMFusion
    from vlm_fusion.tools.tiny import tiny_model_and_processor

    model, processor = tiny_model_and_processor("fusion_llava", video=True, num_frames=4)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    lmm = VLMFusion(pretrained=str(tmp_path / "model"), device="cpu")
    part = {"type": "video", "url": clip_task[1][0], "start_time": 0.5}
    conversation = ChatMessages(messages=[{"role": "user", "content": [part, {"type": "text", "text": "what ?"}]}])
    with pytest.raises(ValueError, match="start_time / end_time is not supported") as refused:
        lmm.inputs([conversation])
    assert "\n" not in str(refused.value)
