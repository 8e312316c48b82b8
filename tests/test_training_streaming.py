"""`vlm-fusion train` on streamed image-caption pairs: WebDataset shards in img2dataset's layout (and a `datasets`
folder with `--streaming`) give the batches the same pairs give as LLaVA JSON (align, qformer); broken shards and
samples are counted and skipped, also from data loader workers; two processes read disjoint shards; a killed run
resumes to the weights of an uninterrupted one; bad input is one line."""

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from itertools import islice

import pytest
import torch
from safetensors.torch import load_file

from conftest import slow_except
from test_training import BRIDGES, KILLED_RUN
from vlm_fusion.tools.tiny import write_training_parts
from vlm_fusion.training import TrainOptions, train
from vlm_fusion.training.streaming import pass_order
from vlm_fusion_cli import main

QFORMER = {"num_query_tokens": 4, "embed_dim": 32, "qformer_dropout": 0.0}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return write_training_parts(tmp_path_factory.mktemp("parts"))


def add(tar, name: str, payload: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def pairs(parts) -> list[tuple[str, bytes, str]]:
    """The 16 pairs of `captions.json` as img2dataset keys them: (key, PNG bytes, caption)."""
    rows = json.loads((parts / "captions.json").read_text())
    return [(f"{i:09d}", (parts / "images" / row["image"]).read_bytes(), row["conversations"][1]["value"])
            for i, row in enumerate(rows)]


def write_sample(tar, key, image=None, caption=None, as_json=False):
    if image is not None:
        add(tar, f"{key}.png", image)
    if caption is not None:
        add(tar, f"{key}.json" if as_json else f"{key}.txt",
            json.dumps({"caption": caption, "key": key}).encode() if as_json else caption.encode())


def in_shard(n: int) -> list[int]:
    """The pairs of shard `n`: one colour each (the tiny data cycle through 4), so that shards differ in content."""
    return [n + 4 * j for j in range(4)]


def write_shards(parts, folder, broken=False) -> str:
    """4 shards of 4 pairs (captions in `.txt`, every other one in `.json` only), as img2dataset writes them; `broken`
    adds a first shard read that is not a tar file and, at the start of three shards, a sample with no caption, one
    with a corrupt image and one with no image. Returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = pairs(parts)
    files = list(range(5 if broken else 4))
    bad = pass_order(5, 0, 0)[0] if broken else None  # read first by the reader (of 1 or of 2) it falls to
    good = [f for f in files if f != bad]
    extras = {good[0]: ("000000100", samples[0][1], None), good[1]: ("000000101", b"\x89PNG not an image", "a lie"),
              good[2]: ("000000102", None, "no picture")} if broken else {}
    for n, f in enumerate(good):
        with tarfile.open(folder / f"{f:05d}.tar", "w") as tar:
            if f in extras:
                write_sample(tar, *extras[f])
            for key, image, caption in [samples[i] for i in in_shard(n)]:
                write_sample(tar, key, image, caption, as_json=int(key) % 2 == 1)
    if broken:
        (folder / f"{bad:05d}.tar").write_text("not a tar file")
    return str(folder / f"{{00000..{files[-1]:05d}}}.tar")


def options(parts, out, data, stage="align", **kwargs):
    defaults = dict(data=data, output_dir=str(out), stage=stage, batch_size=4, max_steps=4, logging_steps=1,
                    save_steps=100, bridge_lr=1e-2)
    model = dict(family="llava", vision_tower=str(parts / "vision"), language_model=str(parts / "lm"),
                 bridge=BRIDGES["llava"]) if stage == "align" else \
        dict(vision_tower=str(parts / "vision"), qformer_init=str(parts / "bert"), bridge=QFORMER)
    return TrainOptions(**{**defaults, **model, **kwargs})


def streamed_batches(run, make_item, collator, count=16, batch=4):
    """The first pass (`count` samples) of a one-reader stream, batched by `batch`, as the trainer gets it (the
    reader's place taken off)."""
    from vlm_fusion.training.streaming import StreamCollator, StreamDataset, open_stream

    dataset = StreamDataset(open_stream(run), make_item, seed=run.seed, image_folder=None)
    items = list(islice(iter(dataset), count))
    batches = [StreamCollator(collator)(items[i: i + batch]) for i in range(0, count, batch)]
    places = [b.pop("stream_state")[2].item() for b in batches]
    assert places == list(range(batch, count + 1, batch))  # the place: records read so far
    return batches


def in_stream_order() -> list[int]:
    return [i for shard in pass_order(4, 0, 0) for i in in_shard(shard)]


def assert_equal_batches(streamed, reference):
    for mine, theirs in zip(streamed, reference, strict=True):
        assert mine.keys() == theirs.keys()
        for key in theirs:
            assert torch.equal(mine[key], theirs[key]), key


def test_streamed_align_batches_equal_the_same_pairs_given_as_llava_json(parts, tmp_path):
    from vlm_fusion.training.conversations import Collator, ConversationDataset, prepare_data
    from vlm_fusion.training.generation import AlignItems
    from vlm_fusion.training.models import load_generation_model

    run = options(parts, tmp_path / "out", write_shards(parts, tmp_path / "shards"))
    model, processor = load_generation_model(run)
    collator = Collator(processor.tokenizer.pad_token_id or 0, model.model_class._per_image_inputs)
    streamed = streamed_batches(run, AlignItems(processor, "plain", "\n", run.max_length), collator)
    json_run = options(parts, tmp_path / "out", str(parts / "captions.json"), image_folder=str(parts / "images"),
                       data_cache=str(tmp_path / "cache"))
    prepared, kept, _ = prepare_data(json_run, processor, "plain", json_run.data)
    dataset = ConversationDataset(processor, prepared, kept)
    order = in_stream_order()
    reference = [collator([dataset[i] for i in order[b: b + 4]]) for b in range(0, 16, 4)]
    assert_equal_batches(streamed, reference)  # the same ids, labels, masks and pixel values


def test_streamed_qformer_batches_equal_the_same_pairs_given_as_llava_json(parts, tmp_path):
    from vlm_fusion.training import qformer

    run = options(parts, tmp_path / "out", write_shards(parts, tmp_path / "shards"), stage="qformer")
    _, processor = qformer.load_qformer_model(run)
    collator = qformer.CaptionCollator(processor)
    streamed = streamed_batches(run, qformer.CaptionItems(processor), collator)
    _, json_pairs = qformer.read_pairs(options(parts, tmp_path / "out", str(parts / "captions.json"), stage="qformer",
                                               image_folder=str(parts / "images")))
    dataset = qformer.CaptionDataset(processor, json_pairs)
    order = in_stream_order()
    reference = [collator([dataset[i] for i in order[b: b + 4]]) for b in range(0, 16, 4)]
    assert_equal_batches(streamed, reference)  # image_ids too: img2dataset's numeric keys


BROKEN = {"unreadable shard": 1, "no image": 1, "no caption": 1, "unreadable image": 1, "unreadable clip": 0,
          "short clip": 0}  # clips: test_training_video


@pytest.mark.parametrize("workers", [0, 2])
def test_broken_shards_and_samples_are_counted_and_skipped(parts, tmp_path, workers):
    out = tmp_path / "out"
    summary = train(options(parts, out, write_shards(parts, tmp_path / "shards", broken=True), workers=workers))
    # one pass over the 16 good pairs (each reader's last batch ends its pass), the broken ones met on the way
    assert summary["samples"] == 16 and summary["steps"] == 4
    assert summary["samples_broken"] == BROKEN and summary["samples_skipped"] == 0
    assert json.loads((out / "training_summary.json").read_text())["samples_broken"] == BROKEN
    history = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())["log_history"]
    assert [entry["samples_broken"] for entry in history if "loss" in entry][-1] == 4


def test_a_datasets_folder_streams_with_its_length_known(parts, tmp_path):
    import datasets

    samples = pairs(parts)
    folder = tmp_path / "pairs"
    datasets.Dataset.from_dict({"image": [{"bytes": image, "path": None} for _, image, _ in samples],
                                "caption": [caption for _, _, caption in samples]},
                               features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
                               ).save_to_disk(str(folder))
    summary = train(options(parts, tmp_path / "out", str(folder), stage="qformer", streaming=True, max_steps=-1,
                            epochs=2))
    assert summary["steps"] == 8 and summary["samples"] == 32  # 2 epochs of 16 pairs, by 4: counted from the rows
    assert summary["stream"]["passes"] == 2 and summary["samples_broken"] == {reason: 0 for reason in BROKEN}


BAD = [
    ("no file", lambda shards: shards.replace("00000..00003", "00100..00103"), [], "no shard file matches"),
    ("fewer shards", lambda shards: shards, ["--workers", "5"],
     "4 shard\\(s\\) for 1 process\\(es\\) x 5 data loader worker\\(s\\): each of the 5 readers needs a shard"),
    ("no max steps", lambda shards: shards, ["--max-steps", "-1"],
     "streaming 4 shard\\(s\\): the number of samples is unknown .*give --max-steps"),
    ("instruct", lambda shards: shards, ["--stage", "instruct"],
     "streamed data are image-caption pairs: --stage align or --stage qformer, not instruct"),
    ("eval data", lambda shards: shards, ["--eval-data", "held_out.json"],
     "--eval-data is not read beside streamed --data"),
]


@pytest.mark.parametrize("edit,extra,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_streaming_input_is_one_line_and_nothing_is_written(parts, tmp_path, capsys, edit, extra, message):
    import re

    shards = edit(write_shards(parts, tmp_path / "shards"))
    out = tmp_path / "out"
    argv = ["train", "--stage", "align", "--family", "llava", "--vision-tower", str(parts / "vision"),
            "--language-model", str(parts / "lm"), "--data", shards, "--output-dir", str(out), "--max-steps", "2",
            *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not out.exists()


def test_the_readmes_shards_snippet_run_twice_writes_each_pair_once(parts, tmp_path):
    import re

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    snippet = next(s for s in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "tarfile.open" in s)
    (tmp_path / "parts").symlink_to(parts)
    for _ in range(2):
        subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, check=True, timeout=120)
    names = [tarfile.open(path).getnames() for path in sorted((tmp_path / "shards").glob("*.tar"))]
    assert [len(n) for n in names] == [8, 8, 8, 8] and all(len(set(n)) == 8 for n in names)  # 4 pairs, once each


# ---- two processes through the launcher --------------------------------------------------------------------------
RECORD = textwrap.dedent("""
    import json, os
    if os.environ.get("STREAM_RECORD"):  # every batch the trainer takes, by process: its image ids
        from vlm_fusion.training import trainer
        taken = trainer.Consumed.__iter__
        def record(self):
            for batch in taken(self):
                with open(f"{os.environ['STREAM_RECORD']}.{os.environ.get('RANK', '0')}", "a") as f:
                    f.write(json.dumps(batch["image_ids"].tolist()) + "\\n")
                yield batch
        trainer.Consumed.__iter__ = record
""")


@pytest.mark.slow  # two launched processes (40 s of the default run's 7 minutes): .ci/run runs it
def test_two_processes_through_the_launcher_read_disjoint_shards(parts, tmp_path):
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(RECORD)
    record = tmp_path / "ids"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), os.environ.get("PYTHONPATH", "")]),
           "STREAM_RECORD": str(record), "OMP_NUM_THREADS": "1"}
    argv = ["train", "--accelerate", "ddp", "--num-processes", "2", "--stage", "qformer",
            "--vision-tower", str(parts / "vision"), "--qformer-init", str(parts / "bert"),
            "--data", write_shards(parts, tmp_path / "shards"), "--output-dir", str(tmp_path / "out"),
            "--batch-size", "4", "--max-steps", "2", "--logging-steps", "1",
            *[item for k, v in QFORMER.items() for item in ("--bridge", f"{k}={v}")]]
    done = subprocess.run([sys.executable, "-m", "vlm_fusion_cli", *argv], capture_output=True, text=True,
                          timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    seen = [{i for line in open(f"{record}.{rank}") for i in json.loads(line)} for rank in range(2)]
    order = pass_order(4, 0, 0)
    for rank in range(2):  # rank r reads the shards order[r::2] of the pass: 2 shards, 8 pairs, in its 2 steps
        assert seen[rank] == {i for shard in order[rank::2] for i in in_shard(shard)}
    assert not seen[0] & seen[1]
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["samples"] == 16 and summary["stream"]["readers"] == 2


# ---- killed mid-run, then --resume ------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", slow_except("0", ["0", "2"]))  # data workers: the other tests
def test_a_killed_streamed_run_resumes_to_the_weights_of_an_uninterrupted_one(parts, tmp_path, workers):
    shards = write_shards(parts, tmp_path / "shards", broken=True)

    def argv(out):  # 7 steps of 4: past the first pass (16 good pairs), so the resumed run also wraps around
        return ["--stage", "align", "--family", "blip2", "--vision-tower", str(parts / "vision"),
                "--language-model", str(parts / "lm"), "--data", shards, "--output-dir", str(out),
                "--batch-size", "4", "--max-steps", "7", "--save-steps", "3", "--logging-steps", "1",
                "--bridge-lr", "1e-3", "--workers", workers, "--bridge", "num_query_tokens=4",
                "--bridge", "qformer_hidden_size=64", "--bridge", "qformer_num_hidden_layers=1",
                "--bridge", "qformer_num_attention_heads=4", "--bridge", "qformer_intermediate_size=128"]  # dropout on

    assert main(["train", *argv(tmp_path / "whole")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, "SIGKILL", "5", *argv(tmp_path / "run")],
                            capture_output=True, text=True, timeout=600, env=env)
    assert killed.returncode == -9
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-3"]
    assert main(["train", *argv(tmp_path / "run"), "--resume"]) == 0
    resumed, reference = load_file(tmp_path / "run" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)
    summaries = [json.loads((tmp_path / name / "training_summary.json").read_text()) for name in ("run", "whole")]
    assert summaries[0]["samples_broken"] == summaries[1]["samples_broken"]  # counted once, not again on resume
    assert summaries[0]["samples"] == summaries[1]["samples"] == 28
