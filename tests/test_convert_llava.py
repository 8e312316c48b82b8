"""Conversion parity: transformers' own Llava (the reference) vs the converted fusion_llava model."""

import json

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionModel,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from conftest import load_script, random_image
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
        with torch.no_grad():
            for batch in ({k: v[:1] for k, v in inputs.items()}, inputs):  # single, then batched with left padding
                mask = batch["attention_mask"].bool()
                diff = (ours(**batch).logits - reference(**batch).logits)[mask].abs().max().item()
                print(f"llava-hf parity ({len(batch['input_ids'])} samples): max |dlogit| = {diff:.2e}")
                assert diff <= 1e-4
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
    assert diff <= 1e-4
