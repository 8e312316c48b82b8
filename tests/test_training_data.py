"""The data pass of `vlm-fusion train` (`training/cache.py`): its samples equal the reference encoding, it runs once and
is reused (by a rerun, by `--resume`), it is rebuilt when what it depends on changes, and bad input is one line."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import FLOAT32_REORDER
from vlm_fusion.tools.tiny import write_training_parts
from vlm_fusion.training import TrainOptions, cache, data, train
from vlm_fusion.training.encoding import encode
from vlm_fusion.training.conversations import ConversationDataset, plain_end, prepare_data
from vlm_fusion.training.models import load_generation_model, load_processor

FLAMINGO = {"num_latents": 4, "perceiver_depth": 1, "perceiver_heads": 2, "perceiver_head_dim": 16,
            "cross_attention_heads": 2, "cross_attention_head_dim": 16}
BRIDGES = {"llava": {"projector_type": "mlp2x_gelu"}, "flamingo": FLAMINGO,
           "blip2": {"num_query_tokens": 4, "qformer_hidden_size": 64, "qformer_num_hidden_layers": 1,
                     "qformer_num_attention_heads": 4, "qformer_intermediate_size": 128, "qformer_text_input": True}}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return write_training_parts(tmp_path_factory.mktemp("parts"))


def options(parts, tmp_path, family="llava", data_file="conversations.json", **kwargs):
    return TrainOptions(**{**dict(data=str(parts / data_file), image_folder=str(parts / "images"),
                                  output_dir=str(tmp_path / "out"), stage="instruct", family=family,
                                  vision_tower=str(parts / "vision"), language_model=str(parts / "lm"),
                                  bridge=BRIDGES[family], batch_size=4, max_steps=2, logging_steps=1,
                                  data_cache=str(tmp_path / "cache")), **kwargs})


@pytest.mark.parametrize("family,layout,workers", [("llava", "chat", 2), ("blip2", "chat", 0), ("flamingo", "plain", 0),
                                                   ("llava", "plain", 2)])
def test_cached_samples_equal_the_reference_encoding(parts, tmp_path, monkeypatch, family, layout, workers):
    """Every sample the training loop reads from the cache — ids, labels, images, the Q-Former's instruction — equals
    what the reference path (`data.load`, `encoding.encode`, the processor) makes of the same conversation."""
    data_file = "conversations.json" if layout == "chat" else "captions.json"
    o = options(parts, tmp_path, family, data_file=data_file, data_workers=workers)
    if workers:  # blocks of 3 samples from the workers, joined into record batches of 5 or more in the file
        monkeypatch.setattr(cache, "BLOCK", 3)
        monkeypatch.setattr(cache, "WRITE_ROWS", 5)
    _, processor = load_generation_model(o)
    prepared, kept, skipped = prepare_data(o, load_processor(o), layout, o.data)
    assert prepared.built and skipped == 0
    dataset = ConversationDataset(processor, prepared, kept)
    conversations, _ = data.load(o.data, o.image_folder)
    assert len(dataset) == len(conversations) == 16
    assert len(prepared.dataset.data.to_batches()) == (3 if workers else 1)  # rows 0-5, 6-11, 12-15
    for item, conversation in zip(dataset, conversations):
        sizes = [data.image_size(image, conversation.id) for image in conversation.images]
        reference = encode(processor, conversation, sizes, layout, plain_end(o, processor))
        assert item["input_ids"].tolist() == reference.input_ids
        assert item["labels"].tolist() == reference.labels
        images = [data.open_image(image) for image in conversation.images]
        expected = processor(images=images or None, text=[reference.text], return_tensors="pt",
                             add_special_tokens=reference.add_special_tokens)
        if images:
            assert torch.equal(item["pixel_values"], expected["pixel_values"])
        if "qformer_input_ids" in item:  # InstructBLIP's Q-Former reads the user turns
            assert item["qformer_input_ids"].tolist() == processor.qformer_inputs(
                [reference.instruction], return_tensors="pt")["qformer_input_ids"][0].tolist()


def test_a_rerun_and_a_resume_read_the_cache_and_a_change_rebuilds_it(parts, tmp_path, monkeypatch):
    o = options(parts, tmp_path, data_workers=0)
    first = train(o)
    assert first["data_cache"]["built"]
    folder = first["data_cache"]["folder"]
    built_at = os.stat(os.path.join(folder, "samples.arrow")).st_mtime_ns

    def no_pass(*args, **kwargs):
        raise AssertionError("the data pass ran again")

    with monkeypatch.context() as m:  # a rerun and a resume: no data pass
        m.setattr(cache, "build", no_pass)
        again = train(options(parts, tmp_path, data_workers=0, overwrite=True))
        resumed = train(options(parts, tmp_path, data_workers=0, resume=True, max_steps=3))
    assert not again["data_cache"]["built"] and not resumed["data_cache"]["built"]
    assert again["data_cache"]["folder"] == resumed["data_cache"]["folder"] == folder
    assert os.stat(os.path.join(folder, "samples.arrow")).st_mtime_ns == built_at

    # an image the data lists changes: the same folder is built again; another chat template: another folder
    image = parts / "images" / "0.png"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10 ** 9))
    changed = train(options(parts, tmp_path, data_workers=0, overwrite=True))
    assert changed["data_cache"]["built"] and changed["data_cache"]["folder"] == folder
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}")
    other = train(options(parts, tmp_path, data_workers=0, overwrite=True, chat_template=str(template)))
    assert other["data_cache"]["built"] and other["data_cache"]["folder"] != folder


def test_a_killed_data_pass_leaves_nothing_that_is_used(parts, tmp_path, monkeypatch):
    o = options(parts, tmp_path, data_workers=0)
    real = cache.encode_block

    def dies(block):  # the pass is stopped (Ctrl-C, a kill) in its first block
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "encode_block", dies)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(o, load_processor(o), "chat", o.data)
    assert not [p for p in os.listdir(tmp_path / "cache") if not p.endswith(".lock")]
    monkeypatch.setattr(cache, "encode_block", real)
    prepared, _, _ = prepare_data(o, load_processor(o), "chat", o.data)
    assert prepared.built and len(prepared.dataset) == 16


def test_the_data_pass_holds_no_sample_list_and_reads_a_json_list_object_by_object(tmp_path):
    """A JSON list is parsed one object at a time (any chunk size gives the same rows), and an invalid one is one line
    naming the sample it broke at."""
    rows = [{"id": f"s{i}", "conversations": [{"from": "human", "value": "hi ]" * (i % 5)},
                                              {"from": "gpt", "value": "{yes}"}]} for i in range(500)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows, indent=1))
    for chunk in (5, 97, 1 << 20):
        assert list(data.iter_json(str(path), chunk)) == rows
    path.write_text(json.dumps(rows)[:-30])
    with pytest.raises(data.DataError, match=r"data.json is not valid JSON \(sample 500 of the list"):
        list(data.iter_json(str(path), 64))
    # the place is json's own (line and column in the file), whatever the chunk the break fell in
    text = json.dumps(rows, indent=1)
    for broken, message in [(text.replace('"s321",', '"s321"', 1), "sample 322 of the list: Expecting ',' delimiter"),
                            (text.replace('},\n {\n  "id": "s400"', '}\n {\n  "id": "s400"', 1),
                             "expected `,` or `]` after sample 400 of the list")]:
        path.write_text(broken)
        with pytest.raises(json.JSONDecodeError) as error:
            json.loads(broken)
        for chunk in (5, 97, 1 << 20):
            with pytest.raises(data.DataError) as caught:
                list(data.iter_json(str(path), chunk))
            assert str(caught.value) == (f"{path} is not valid JSON ({message}, line {error.value.lineno} column "
                                         f"{error.value.colno})")
    path.with_suffix(".jsonl").write_text('{"id": 1}\n{"id": 2,}\n')
    with pytest.raises(data.DataError, match=r"is not valid JSON lines \(line 2 column 10: Expecting property name"):
        list(data.iter_json(str(path.with_suffix(".jsonl"))))
    path.write_text(json.dumps({"id": 1}))
    with pytest.raises(data.DataError, match="must hold a list of samples"):
        list(data.iter_json(str(path)))


def test_a_cache_folder_that_is_not_writable_is_one_line(parts, tmp_path, capsys):
    from vlm_fusion_cli import main

    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder")
    argv = ["train", "--stage", "instruct", "--family", "llava", "--vision-tower", str(parts / "vision"),
            "--language-model", str(parts / "lm"), "--data", str(parts / "conversations.json"), "--image-folder",
            str(parts / "images"), "--output-dir", str(tmp_path / "out"), "--max-steps", "1",
            "--data-cache", str(blocked / "cache")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.match(r"vlm-fusion: error: train: --data-cache .*blocked/cache is not a writable folder", err[-1])
    assert not (tmp_path / "out").exists()


def test_the_log_says_where_the_cache_is_and_how_big_and_clear_data_cache_keeps_only_what_the_run_uses(
        parts, tmp_path, caplog):
    from vlm_fusion_cli import main

    root = tmp_path / "cache"
    argv = ["train", "--stage", "instruct", "--family", "llava", "--vision-tower", str(parts / "vision"),
            "--language-model", str(parts / "lm"), "--image-folder", str(parts / "images"), "--max-steps", "1",
            "--data-cache", str(root), "--data-workers", "0"]
    for name in ("captions.json", "conversations.json"):  # two data passes in the cache
        assert main([*argv, "--data", str(parts / name), "--output-dir", str(tmp_path / name)]) == 0
    entries, size = cache.usage(str(root))
    assert entries == 2 and size == sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.parent != root)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"data cache: {root} holds")]
    assert said[-1] == (f"data cache: {root} holds 2 data pass(es), {cache.human_size(size)} (--clear-data-cache "
                        "removes those a run does not use)")
    (root / "stale.partial-123").mkdir()  # a killed build's leftovers go too
    caplog.clear()
    assert main([*argv, "--data", str(parts / "captions.json"), "--output-dir", str(tmp_path / "again"),
                 "--clear-data-cache"]) == 0
    kept = [p.name for p in root.iterdir() if p.is_dir()]
    assert len(kept) == 1 and kept[0].startswith("captions.json-chat-")  # this run's, reused
    assert any(r.getMessage().startswith(f"data cache: removed 2 data pass(es) this run does not use from {root}, ")
               for r in caplog.records)
    assert cache.human_size(512) == "512 B" and cache.human_size(3 * 1024 ** 2) == "3.0 MB"


def test_lengths_come_from_the_cache_for_length_grouping(parts, tmp_path):
    o = options(parts, tmp_path, data_workers=0)
    _, processor = load_generation_model(o)
    prepared, kept, _ = prepare_data(o, load_processor(o), "chat", o.data)
    dataset = ConversationDataset(processor, prepared, kept)
    assert isinstance(dataset.lengths, np.ndarray)
    assert dataset.lengths.tolist() == [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


def test_the_eval_loss_equals_the_loss_computed_directly_on_the_held_out_samples(parts, tmp_path):
    from transformers import AutoModelForImageTextToText

    from vlm_fusion.training.conversations import Collator

    o = options(parts, tmp_path, data_workers=0, eval_data=str(parts / "conversations.json"), eval_steps=2,
                max_steps=2, save_steps=2)
    summary = train(o)
    assert summary["eval_data"] == {"data": "conversations.json", "samples": 16, "samples_skipped": 0}
    history = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    logged = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert len(logged) == 1

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    _, processor = load_generation_model(o)
    prepared, kept, _ = prepare_data(o, load_processor(o), "chat", o.eval_data)
    dataset = ConversationDataset(processor, prepared, kept)
    collate = Collator(processor.tokenizer.pad_token_id or 0, model.model_class._per_image_inputs)
    with torch.no_grad():
        losses = [model(**collate([dataset[i] for i in range(start, start + 4)])).loss.item()
                  for start in range(0, len(dataset), 4)]
    # the same batches through the same weights, summed in another order (the trainer's gathering, its thread count)
    assert logged[0] == pytest.approx(sum(losses) / len(losses), rel=FLOAT32_REORDER)


def test_eval_data_with_a_missing_image_is_one_line_naming_the_flag(parts, tmp_path, capsys):
    from vlm_fusion_cli import main

    rows = json.loads((parts / "captions.json").read_text())
    rows[2]["image"] = "nowhere.png"
    held_out = tmp_path / "held_out.json"
    held_out.write_text(json.dumps(rows))
    argv = ["train", "--stage", "align", "--family", "llava", "--vision-tower", str(parts / "vision"),
            "--language-model", str(parts / "lm"), "--data", str(parts / "captions.json"), "--image-folder",
            str(parts / "images"), "--output-dir", str(tmp_path / "out"), "--max-steps", "1",
            "--eval-data", str(held_out), "--data-cache", str(tmp_path / "cache")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.match(r"vlm-fusion: error: train: --eval-data: sample cap2: image file .*nowhere.png is missing$", err[-1])
    assert not (tmp_path / "out").exists()


def test_the_fast_encoder_checks_itself_and_falls_back_to_the_reference(parts, tmp_path, monkeypatch, caplog):
    """A chat template the fast path would render differently (here: made to start with a tilde) is caught on the first
    sample, and every sample is then encoded the reference way."""
    from vlm_fusion.training import encoding

    o = options(parts, tmp_path)
    processor = load_processor(o)
    conversations, _ = data.load(o.data, o.image_folder)
    sizes = [[data.image_size(image, c.id) for image in c.images] for c in conversations]
    fast = encoding.Encoder(processor, "chat", "\n")
    rows = [fast(c, s) for c, s in zip(conversations, sizes)]
    assert fast.fast  # the fast path matched the reference
    original = encoding.Encoder._render
    monkeypatch.setattr(encoding.Encoder, "_render", lambda self, m, g: "~" + original(self, m, g))
    drifting = encoding.Encoder(processor, "chat", "\n")
    fallback = [drifting(c, s) for c, s in zip(conversations, sizes)]
    assert not drifting.fast and "differs from the reference" in caplog.text
    for row, other, conversation, size in zip(rows, fallback, conversations, sizes):
        assert encoding.rows_equal(row, other)
        reference = encode(processor, conversation, size, "chat", "\n")
        ids, labels = encoding.expand(row, processor)
        assert ids.tolist() == reference.input_ids and labels.tolist() == reference.labels


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama-2's layout: the system turn folded into the first user turn, contents trimmed (a template that changes them)
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set messages = "
          "messages[1:] %}{% endif %}{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' }}"
          "{% if loop.first and system is defined %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
          "{{ m['content'] | trim + ' [/INST]' }}{% else %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")
# a template that decides from the content: an image turn gets a prefix no other turn has
BRANCHING = ("{% for m in messages %}{% if '<image>' in m['content'] %}{{ 'V ' }}{% endif %}{{ m['role'] + ': ' + "
             "m['content'] + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
# a template that escapes the contents (JSON strings): nothing is called on them, the text differs
TOJSON = ("{% for m in messages %}{{ m['role'] + ': ' }}{{ m['content'] | tojson }}{{ '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def turns_template(body: str) -> str:
    """A template writing each message as `body` (with `m` the message) and `assistant: ` as its generation prompt."""
    return f"{{% for m in messages %}}{body}{{% endfor %}}{{% if add_generation_prompt %}}assistant: {{% endif %}}"


@pytest.mark.parametrize("template, blind", [
    (None, True), (CHATML, True), (turns_template("{{ m['role'] ~ ': ' ~ m['content'] ~ '\\n' }}"), True),
    (LLAMA2, False), (BRANCHING, False), (TOJSON, False),
    (turns_template("{{ m['role'] }}: {% if m['content'] %}{{ m['content'] }}{% endif %}\n"), False),
    (turns_template("{{ m['role'] }}: {{ m['content'] }} ({{ m['content'] | length }})\n"), False),
    (turns_template("{{ m['role'] }}: {{ m['content'].split('?')[0] }}\n"), False),
    (turns_template("{{ m['role'] }}: {{ m['content'] | e }}\n"), False),
    (turns_template("{% set c = m['content'] ~ '' %}{{ m['role'] }}: {{ m['content'] }}\n"), False),
], ids=["default", "chatml", "tilde", "llama2", "branching", "tojson", "if", "length", "split", "escape", "twice"])
def test_a_skeleton_is_blind_only_where_the_template_just_prints_the_contents(parts, tmp_path, template, blind):
    """A blind skeleton skips the per-sample render: the template must do nothing with a content but print it — no
    test, method, length, escaping (`tojson`, `e`: nothing called, the text differs) or second use."""
    from vlm_fusion.training import encoding

    processor = load_processor(options(parts, tmp_path))
    if template:
        processor.chat_template = template
    renderer = encoding.Encoder(processor, "chat", "\n")._render
    for roles in [("user", "assistant"), ("system", "user", "assistant", "user", "assistant")]:
        skeleton = encoding.Skeleton.of(processor, roles, renderer)
        assert skeleton is not None and skeleton.blind is blind, roles


def test_a_processor_that_changes_the_rendered_text_is_never_blind():
    """IDEFICS's processor wraps each run of `<image>` in the rendered text (and writes BOS): its skeletons are
    checked per sample, whatever the template."""
    from vlm_fusion.processing_idefics import FusionIdeficsProcessor
    from vlm_fusion.tools.tiny import tiny_model_and_processor
    from vlm_fusion.training import encoding

    _, flamingo = tiny_model_and_processor("fusion_flamingo")
    processor = FusionIdeficsProcessor(image_processor=flamingo.image_processor, tokenizer=flamingo.tokenizer,
                                       chat_template=CHATML)
    skeleton = encoding.Skeleton.of(processor, ("user", "assistant"),
                                    encoding.Encoder(processor, "chat", "\n")._render)
    assert skeleton is not None and not skeleton.blind
    flamingo.chat_template = CHATML  # the same template and tokenizer, the text as rendered: blind
    renderer = encoding.Encoder(flamingo, "chat", "\n")._render
    assert encoding.Skeleton.of(flamingo, ("user", "assistant"), renderer).blind


@pytest.mark.parametrize("template", [None, CHATML, LLAMA2, BRANCHING, TOJSON],
                         ids=["default", "chatml", "llama2", "branching", "tojson"])
def test_the_fast_encoder_equals_the_reference_on_every_sample_for_any_template(parts, tmp_path, monkeypatch, template):
    """The fast path renders a conversation from its roles' skeleton (the template run with placeholder contents);
    with no periodic check at all, every sample's row equals `encode`'s — for templates that fold turns together,
    trim contents or branch on them (those samples go the per-prefix way, caught by the whole-text comparison)."""
    from vlm_fusion.training import encoding

    monkeypatch.setattr(encoding, "VERIFY_EVERY", 10**9)  # only the first sample is checked: the rest is the fast path
    processor = load_processor(options(parts, tmp_path))
    if template:
        processor.chat_template = template
    image = str(parts / "images" / "0.png")
    turns = [("user", "<image>\nwhat colour ?"), ("assistant", "red"), ("user", "  and now ?\n"),
             ("assistant", " blue, {{ not jinja }} \ue000 "), ("user", "last"), ("assistant", "green  ")]
    conversations = []
    for n, system in [(2, None), (4, None), (6, None), (2, "be brief  "), (6, "be brief"), (4, " ")]:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": role, "content": content} for role, content in turns[:n]]
        conversations.append(data.Conversation(f"c{len(conversations)}", messages, [image]))
    conversations.append(data.Conversation("text-only", [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "hello"}]))
    fast = encoding.Encoder(processor, "chat", "\n")
    renders, original = [], fast._render
    monkeypatch.setattr(fast, "_render", lambda m, g: renders.append(len(m)) or original(m, g))
    for round in range(2):
        renders.clear()
        for conversation in conversations:
            sizes = [data.image_size(i, conversation.id) for i in conversation.images]
            row = fast(conversation, sizes)
            reference = encode(processor, conversation, sizes, "chat", "\n")
            ids, labels = encoding.expand(row, processor)
            assert row["text"] == reference.text, conversation.id
            assert ids.tolist() == reference.input_ids and labels.tolist() == reference.labels, conversation.id
    assert fast.fast
    # Second round, every skeleton built: where the template only prints the contents, no render at all (the skeleton
    # is blind to them); else one per sample (the whole conversation, the check), and the trimming, branching and
    # escaping templates send the samples they change the per-prefix way.
    if template in (None, CHATML):
        assert renders == []
    else:
        assert len(conversations) < len(renders) < 5 * len(conversations)


def test_a_failed_data_pass_stops_its_workers_whatever_sigterm_handler_the_process_has():
    """A forked worker inherits the parent's Python SIGTERM handler: a flag-setting one (a training run's, left by a
    run that failed early) made `Pool.terminate` wait forever for a worker blocked on the task queue. It must end."""
    code = (
        "import signal\n"
        "from vlm_fusion.tools.tiny import tiny_model_and_processor\n"
        "from vlm_fusion.training import cache\n"
        "_, processor = tiny_model_and_processor('fusion_llava')\n"
        "signal.signal(signal.SIGTERM, lambda *_: None)\n"
        "try:\n"
        "    with cache.worker_pool(2, processor, 'chat', None) as run:\n"
        "        raise RuntimeError('a bad sample')\n"
        "except RuntimeError:\n"
        "    print('workers stopped')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0 and "workers stopped" in done.stdout, done.stderr[-2000:]
