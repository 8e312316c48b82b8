"""Conversion parity: transformers' own Llava (the reference) vs the converted fusion_llava model."""

import json
import os
import signal
import stat
import time

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionModel,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from conftest import assert_same_logits, load_script, random_image, reorder_bound
from vlm_fusion import FusionLlavaForConditionalGeneration, FusionLlavaProcessor
from vlm_fusion.tools.tiny import tiny_image_processor, tiny_text_config, tiny_tokenizer, tiny_vision_config

from vlm_fusion.conversion import convert_llava  # noqa: E402

convert_llava_script = load_script("convert_llava")  # the command-line entry point
PROMPTS = ["USER: <image>\nwhat is shown ? ASSISTANT:", "USER: <image>\nhow many shapes are there in this image ? ASSISTANT:"]


@pytest.fixture(scope="module")
def llava_hf_dir(tmp_path_factory):
    """A tiny transformers LlavaForConditionalGeneration (CLIP + Llama) saved with its LlavaProcessor."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(image_processor=tiny_image_processor(32), tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaConfig(vision_config=tiny_vision_config("clip"),
                         text_config=tiny_text_config("llama", vocab_size=len(tokenizer)),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=16)
    model = LlavaForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("llava_hf")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def converted(llava_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "fusion"
    assert convert_llava_script.main(["--source", "llava-hf", "--input", str(llava_hf_dir), "--output", str(out)]) == 0
    return out


def test_llava_hf_logits_and_greedy_tokens_match_transformers(llava_hf_dir, converted):
    reference = LlavaForConditionalGeneration.from_pretrained(llava_hf_dir).eval()
    reference_processor = LlavaProcessor.from_pretrained(llava_hf_dir)
    ours = AutoModelForImageTextToText.from_pretrained(converted).eval()
    processor = FusionLlavaProcessor.from_pretrained(converted)
    assert isinstance(ours, FusionLlavaForConditionalGeneration)
    for padding_side in ("left",):
        processor.tokenizer.padding_side = reference_processor.tokenizer.padding_side = padding_side
        images = [random_image(0), random_image(1)]
        inputs = processor(images=images, text=PROMPTS, padding=True, return_tensors="pt")
        ref_inputs = reference_processor(images=images, text=PROMPTS, padding=True, return_tensors="pt")
        assert torch.equal(inputs["input_ids"], ref_inputs["input_ids"])
        for batch in ({k: v[:1] for k, v in inputs.items()}, inputs):  # single, then batched with left padding
            assert_same_logits(f"llava-hf parity ({len(batch['input_ids'])} samples)", ours, reference, batch)
        with torch.no_grad():
            ours_tokens = ours.generate(**inputs, max_new_tokens=8, do_sample=False)
            ref_tokens = reference.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert torch.equal(ours_tokens, ref_tokens)


def corrupted_copy(source, target, edit):
    """Copy a checkpoint directory, applying `edit` to its weights."""
    from safetensors.torch import load_file, save_file

    target.mkdir()
    for f in source.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    weights = load_file(target / "model.safetensors")
    edit(weights)
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_conversion_fails_on_unconsumed_key_and_writes_nothing(llava_hf_dir, tmp_path, capsys):
    bad = corrupted_copy(llava_hf_dir, tmp_path / "bad", lambda w: w.update({"model.extra_adapter.weight": torch.zeros(2)}))
    out = tmp_path / "out"
    assert convert_llava.main(["--source", "llava-hf", "--input", str(bad), "--output", str(out)]) == 1
    assert "model.extra_adapter.weight" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no output, no partial directory


def test_conversion_fails_on_shape_mismatch(llava_hf_dir, tmp_path, capsys):
    def shrink_projector(weights):
        key = next(k for k in weights if k.endswith("multi_modal_projector.linear_1.weight"))
        weights[key] = weights[key][:, :-1].contiguous()

    bad = corrupted_copy(llava_hf_dir, tmp_path / "bad", shrink_projector)
    assert convert_llava.main(["--source", "llava-hf", "--input", str(bad), "--output", str(tmp_path / "out")]) == 1
    assert "shape mismatch" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_conversion_refuses_to_overwrite(converted, llava_hf_dir):
    with pytest.raises(SystemExit):
        convert_llava.main(["--source", "llava-hf", "--input", str(llava_hf_dir), "--output", str(converted)])


@pytest.fixture(scope="module")
def original_llava_dir(llava_hf_dir, tmp_path_factory):
    """The same tiny weights in the original LLaVA layout: LlamaForCausalLM keys + model.mm_projector.{0,2}."""
    from safetensors.torch import load_file, save_file

    reference = LlavaForConditionalGeneration.from_pretrained(llava_hf_dir)
    root = tmp_path_factory.mktemp("original")
    vision_dir, llava_dir = root / "clip", root / "llava"
    tower = CLIPVisionModel(reference.config.vision_config)
    tower.load_state_dict(reference.model.vision_tower.state_dict())
    tower.save_pretrained(vision_dir)
    tiny_image_processor(32).save_pretrained(vision_dir)
    lm = LlamaForCausalLM(reference.config.text_config)
    lm.model.load_state_dict(reference.model.language_model.state_dict())
    lm.lm_head.load_state_dict(reference.lm_head.state_dict())
    tokenizer = tiny_tokenizer()  # the original tokenizer has no <image> token
    lm.resize_token_embeddings(len(tokenizer))  # and its LM no row for one
    lm.save_pretrained(llava_dir)
    tokenizer.save_pretrained(llava_dir)
    weights = load_file(llava_dir / "model.safetensors")
    projector = reference.model.multi_modal_projector
    for index, layer in (("0", projector.linear_1), ("2", projector.linear_2)):
        weights[f"model.mm_projector.{index}.weight"] = layer.weight.detach().clone()
        weights[f"model.mm_projector.{index}.bias"] = layer.bias.detach().clone()
    save_file(weights, llava_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((llava_dir / "config.json").read_text())
    config.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], mm_projector_type="mlp2x_gelu",
                  mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_hidden_size=64,
                  mm_vision_tower="openai/clip-vit-large-patch14-336", mm_use_im_start_end=False,
                  mm_use_im_patch_token=False, image_aspect_ratio="pad", tune_mm_mlp_adapter=False)
    (llava_dir / "config.json").write_text(json.dumps(config))
    return llava_dir, vision_dir


def test_original_layout_converts_and_matches_transformers_llava(original_llava_dir, llava_hf_dir, tmp_path):
    llava_dir, vision_dir = original_llava_dir
    out = tmp_path / "fusion"
    assert convert_llava.main(["--source", "original", "--input", str(llava_dir), "--vision-tower", str(vision_dir),
                               "--output", str(out)]) == 0
    ours = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = FusionLlavaProcessor.from_pretrained(out)
    assert processor.image_token_id == ours.config.image_token_id == len(tiny_tokenizer())  # outside the LM vocabulary
    reference = LlavaForConditionalGeneration.from_pretrained(llava_hf_dir).eval()
    inputs = processor(images=random_image(3), text=PROMPTS[0], return_tensors="pt")
    ref_ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == processor.image_token_id, reference.config.image_token_id)
    with torch.no_grad():
        logits = ours(**inputs).logits  # (1, T, 58): the original LM has no row for <image>
        ref_logits = reference(input_ids=ref_ids, pixel_values=inputs["pixel_values"]).logits[..., : logits.shape[-1]]
        diff = (logits - ref_logits).abs().max()
    print(f"original-layout parity vs transformers Llava: max |dlogit| = {diff:.2e}")
    assert diff <= reorder_bound(ref_logits)


# ---- checkpoints exactly as LLaVA's own code writes them ---------------------------------------------------------
IMAGE_TOKEN_INDEX = -200  # LLaVA's constants.IMAGE_TOKEN_INDEX


def llava_tokenizer_image_token(prompt, tokenizer):
    """LLaVA's `mm_utils.tokenizer_image_token`: each chunk tokenized alone, the BOS kept once."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    separated = [x for chunk in zip(chunks, [[IMAGE_TOKEN_INDEX] * (offset + 1)] * len(chunks)) for x in chunk][:-1]
    for x in separated:
        ids.extend(x[offset:])
    return ids


def llava_expand2square(image, background):
    """LLaVA's `expand2square` (`image_aspect_ratio: pad`)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    size = max(width, height)
    result = Image.new(image.mode, (size, size), background)
    result.paste(image, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return result


def sentencepiece_llama_tokenizer():
    """A Llama tokenizer (BPE, `▁` word boundaries, byte fallback, BOS) small enough for the tiny LM's 58 rows: like
    Llama's own, it starts every text it is given with `▁`, so chunk-by-chunk and whole-prompt tokenization differ."""
    from transformers import LlamaTokenizer

    letters = sorted(set("".join(PROMPTS).replace("<image>", "").replace(" ", "").replace("\n", "")))
    pieces = ["<unk>", "<s>", "</s>", "<0x0A>", "▁", *letters]
    return LlamaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[], add_bos_token=True)


@pytest.fixture(scope="module")
def upstream_llava_dir(original_llava_dir, tmp_path_factory):
    """The tiny weights as LLaVA's train.py saves them: the CLIP tower inside (`model.vision_tower.vision_tower.
    vision_model.*`, transformers 4's CLIPVisionModel names), rotary `inv_freq` buffers in each layer, a
    SentencePiece-style Llama tokenizer, `image_aspect_ratio: pad`."""
    from safetensors.torch import load_file, save_file

    llava_dir, vision_dir = original_llava_dir
    root = tmp_path_factory.mktemp("upstream") / "llava"
    root.mkdir()
    (root / "config.json").write_text((llava_dir / "config.json").read_text())
    weights = load_file(llava_dir / "model.safetensors")
    tower = load_file(vision_dir / "model.safetensors")
    weights.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in tower.items()})
    config = json.loads((llava_dir / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    for i in range(config["num_hidden_layers"]):
        weights[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim)
    save_file(weights, root / "model.safetensors", metadata={"format": "pt"})
    sentencepiece_llama_tokenizer().save_pretrained(root)
    return root, vision_dir


def test_a_checkpoint_as_llavas_training_writes_it_converts(upstream_llava_dir, llava_hf_dir, tmp_path, capsys):
    llava_dir, vision_dir = upstream_llava_dir
    out = tmp_path / "fusion"
    assert convert_llava.main(["--source", "original", "--input", str(llava_dir), "--vision-tower", str(vision_dir),
                               "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    ours = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = FusionLlavaProcessor.from_pretrained(out)
    tokenizer = sentencepiece_llama_tokenizer()
    # The token sequence LLaVA builds, `▁` after <image> included, with its one image index expanded to 16.
    inputs = processor(images=random_image(3), text=PROMPTS[0], return_tensors="pt")
    original = llava_tokenizer_image_token(PROMPTS[0], tokenizer)
    expanded = [t for i in original for t in ([processor.image_token_id] * 16 if i == IMAGE_TOKEN_INDEX else [i])]
    assert inputs["input_ids"][0].tolist() == expanded
    after_image = tokenizer.convert_ids_to_tokens(original[original.index(IMAGE_TOKEN_INDEX) + 1:][:2])
    assert after_image == ["▁", "<0x0A>"]  # whole-prompt tokenization has no `▁` there
    # The tower taken from inside the checkpoint, the inv_freq buffers dropped: the model is transformers' Llava's.
    reference = LlavaForConditionalGeneration.from_pretrained(llava_hf_dir).eval()
    assert all(torch.equal(v, reference.model.vision_tower.state_dict()[k])
               for k, v in ours.model.vision_tower.state_dict().items())
    ref_ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == processor.image_token_id, reference.config.image_token_id)
    with torch.no_grad():
        logits = ours(**inputs).logits
        ref_logits = reference(input_ids=ref_ids, pixel_values=inputs["pixel_values"]).logits[..., : logits.shape[-1]]
    diff = (logits - ref_logits).abs().max().item()
    print(f"LLaVA-training layout vs transformers Llava: max |dlogit| = {diff:.2e}; converter said: "
          + " | ".join(line for line in printed.splitlines() if line.startswith("[verify]")))
    assert diff <= reorder_bound(ref_logits)
    # `image_aspect_ratio: pad`: the processor pads as LLaVA's expand2square does, and says so in its config.
    assert processor.pad_to_square and processor.chunked_tokenization
    wide = random_image(4, size=(20, 48))
    mean = tuple(int(x * 255) for x in processor.image_processor.image_mean)
    expected = processor.image_processor(llava_expand2square(wide, mean), return_tensors="pt")["pixel_values"]
    assert torch.equal(processor(images=wide, text=PROMPTS[0], return_tensors="pt")["pixel_values"], expected)


# ---- the output folder -------------------------------------------------------------------------------------------
def test_stale_partial_output_is_removed_and_the_output_gets_the_users_permissions(llava_hf_dir, tmp_path, capsys):
    stale = tmp_path / ".fusion.partial-k1ll3d"  # what a SIGKILLed conversion to `fusion` leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    other = tmp_path / ".other.partial-abc"  # another output's: not ours to remove
    other.mkdir()
    umask = os.umask(0o022)
    try:
        assert convert_llava.main(["--source", "llava-hf", "--input", str(llava_hf_dir),
                                   "--output", str(tmp_path / "fusion")]) == 0
    finally:
        os.umask(umask)
    assert f"removing {stale}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-abc", "fusion"]
    assert stat.S_IMODE((tmp_path / "fusion").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "fusion" / "model.safetensors").stat().st_mode) == 0o644


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_conversion_ends_in_one_line_and_leaves_nothing(how, tmp_path, capsys):
    from vlm_fusion.conversion import common

    def convert(args):
        with common.atomic_output_dir(str(tmp_path / "out")) as partial:
            (tmp_path / "partial-was").write_text(partial)
            if how == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this

    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    try:
        assert common.run(convert, None) == 130
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGHUP, previous[1])
    err = capsys.readouterr().err
    assert err.strip() == "conversion interrupted: nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial-was"]


# ---- LLaVA-NeXT: dynamic-resolution tiling ---------------------------------------------------------------------
PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
NEXT_SIZES = [(40, 80), (90, 30), (50, 50)]  # (height, width): wide, tall, square


@pytest.fixture(scope="module")
def llava_next_dir(tmp_path_factory):
    """A tiny transformers LlavaNextForConditionalGeneration (CLIP + Llama, 32 px tiles of 8 px patches) saved with its
    LlavaNextProcessor."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaNextConfig(vision_config=tiny_vision_config("clip"),
                             text_config=tiny_text_config("llama", vocab_size=len(tokenizer)),
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=PINPOINTS)
    model = LlavaNextForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("llava_next")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_llava_next_converts_and_matches_transformers_at_several_aspect_ratios(llava_next_dir, tmp_path, capsys):
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    out = tmp_path / "fusion"
    assert convert_llava.main(["--source", "llava-next", "--input", str(llava_next_dir), "--output", str(out)]) == 0
    reference = LlavaNextForConditionalGeneration.from_pretrained(llava_next_dir).eval()
    reference_processor = LlavaNextProcessor.from_pretrained(llava_next_dir)
    ours = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    images = [random_image(i, size=size) for i, size in enumerate(NEXT_SIZES)]
    counts = []
    for image, size in zip(images, NEXT_SIZES):  # each image's placeholders: as transformers counts them
        mine = processor(images=image, text=PROMPTS[0], return_tensors="pt")
        theirs = reference_processor(images=image, text=PROMPTS[0], return_tensors="pt")
        assert torch.equal(mine["input_ids"], theirs["input_ids"]) and torch.equal(mine["pixel_values"], theirs["pixel_values"])
        counts.append(int((mine["input_ids"] == processor.image_token_id).sum()))
        assert counts[-1] == ours.config.num_image_tokens(*size)
        assert_same_logits(f"llava-next parity, one {size[0]}x{size[1]} image ({counts[-1]} tokens)", ours, reference,
                           mine)
    assert len(set(counts)) == 3  # the three aspect ratios take different numbers of tokens
    assert "Images are tiled as LLaVA-NeXT does" in (out / "README.md").read_text()
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images[:2], text=PROMPTS, padding=True, return_tensors="pt")  # mixed sizes, one batch
    assert_same_logits(f"llava-next parity, batch of {NEXT_SIZES[:2]}", ours, reference, batch)
    with torch.no_grad():
        assert torch.equal(ours.generate(**batch, max_new_tokens=6, do_sample=False),
                           reference.generate(**batch, max_new_tokens=6, do_sample=False))
        assert torch.equal(ours.generate(**batch, max_new_tokens=4, num_beams=2, do_sample=False),
                           reference.generate(**batch, max_new_tokens=4, num_beams=2, do_sample=False))
