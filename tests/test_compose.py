"""Composing a model from pretrained parts, and the processor that goes with it."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    Dinov2Model,
    pipeline,
)

from conftest import causal_lm_state_dict, changed_weights, random_image
from vlm_fusion import FusionLlavaForConditionalGeneration, FusionLlavaProcessor
from vlm_fusion.tools.tiny import tiny_image_processor, tiny_text_config, tiny_tokenizer, tiny_vision_config


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A full CLIP checkpoint (text + vision), a DINOv2 checkpoint, and two causal LMs with their tokenizer."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("parts")
    clip_vision = {k: v for k, v in tiny_vision_config("clip").items() if k != "model_type"}
    clip = CLIPModel(CLIPConfig(vision_config=clip_vision, text_config={"hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 99}))
    clip.save_pretrained(root / "clip")
    tiny_image_processor(32).save_pretrained(root / "clip")
    dinov2 = Dinov2Model._from_config(__import__("transformers").AutoConfig.for_model(**tiny_vision_config("dinov2")))
    dinov2.save_pretrained(root / "dinov2")
    tiny_image_processor(32).save_pretrained(root / "dinov2")
    tokenizer = tiny_tokenizer()
    for kind in ("llama", "gpt2"):
        lm = AutoModelForCausalLM.from_config(
            __import__("transformers").AutoConfig.for_model(**tiny_text_config(kind, vocab_size=len(tokenizer)))
        )
        lm.save_pretrained(root / kind)
        tokenizer.save_pretrained(root / kind)
    return root


@pytest.mark.parametrize("vision, text", [("clip", "llama"), ("dinov2", "gpt2")])
def test_from_vision_text_pretrained_keeps_both_parts_and_initialises_only_the_projector(parts, vision, text):
    model = FusionLlavaForConditionalGeneration.from_vision_text_pretrained(
        str(parts / vision), str(parts / text), projector_type="mlp2x_gelu"
    ).eval()
    lm = AutoModelForCausalLM.from_pretrained(parts / text).eval()
    lm_state = lm.state_dict()
    assert all(torch.equal(v, lm_state[k]) for k, v in causal_lm_state_dict(model).items())
    if vision == "clip":
        source = CLIPModel.from_pretrained(parts / "clip").vision_model.state_dict()
        assert source.keys() == model.vision_tower.state_dict().keys()
        assert not changed_weights(model.vision_tower, source)
    else:
        source = Dinov2Model.from_pretrained(parts / "dinov2").state_dict()
        assert source.keys() == model.vision_tower.state_dict().keys()
        assert not changed_weights(model.vision_tower, source)
    # Text-only input gives exactly the language model's logits.
    ids = torch.tensor([[4, 7, 20, 31, 14, 8]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, lm(input_ids=ids).logits)
    assert model.model.multi_modal_projector.linear_1.weight.std() > 0

    processor = FusionLlavaProcessor.from_vision_text_pretrained(str(parts / vision), str(parts / text), model.config)
    assert processor.image_token_id == model.config.image_token_id == len(tiny_tokenizer())
    inputs = processor(images=random_image(0), text="USER: <image>\nwhat is shown ? ASSISTANT:", return_tensors="pt")
    assert (inputs["input_ids"] == processor.image_token_id).sum() == 16
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_processor_round_trip_and_chat_template(parts, tmp_path):
    model = FusionLlavaForConditionalGeneration.from_vision_text_pretrained(str(parts / "clip"), str(parts / "llama"))
    processor = FusionLlavaProcessor.from_vision_text_pretrained(str(parts / "clip"), str(parts / "llama"), model.config)
    processor.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is FusionLlavaProcessor
    assert (loaded.image_seq_length, loaded.image_token_id) == (processor.image_seq_length, processor.image_token_id)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is shown ?"}]}]
    prompt = loaded.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "USER: <image>\nwhat is shown ?\nASSISTANT:"
    a = processor(images=random_image(1), text=prompt, return_tensors="pt")
    b = loaded(images=random_image(1), text=prompt, return_tensors="pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_image_text_to_text_pipeline(parts, tmp_path):
    model = FusionLlavaForConditionalGeneration.from_vision_text_pretrained(str(parts / "clip"), str(parts / "gpt2"))
    processor = FusionLlavaProcessor.from_vision_text_pretrained(str(parts / "clip"), str(parts / "gpt2"), model.config)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    pipe = pipeline("image-text-to-text", model=str(tmp_path))
    messages = [{"role": "user", "content": [{"type": "image", "image": random_image(2)},
                                             {"type": "text", "text": "what is shown ?"}]}]
    out = pipe(text=messages, generate_kwargs={"max_new_tokens": 4, "do_sample": False})
    inputs = processor(images=random_image(2), text="USER: <image>\nwhat is shown ?\nASSISTANT:", return_tensors="pt")
    expected = processor.decode(model.eval().generate(**inputs, max_new_tokens=4, do_sample=False)[0, -4:],
                                skip_special_tokens=True)
    reply = out[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and reply["content"].strip() == expected.strip() != ""


@pytest.mark.parametrize("family", ["fusion_blip2", "fusion_flamingo"])
def test_other_families_compose_from_the_same_parts(parts, family):
    from vlm_fusion import FAMILIES

    _, model_cls, processor_cls, _ = FAMILIES[family]
    small = ({"num_query_tokens": 4, "qformer_hidden_size": 64, "qformer_num_hidden_layers": 2,
              "qformer_num_attention_heads": 4, "qformer_intermediate_size": 128} if family == "fusion_blip2" else
             {"num_latents": 4, "perceiver_depth": 1, "cross_attention_every_n_layers": 2})
    model = model_cls.from_vision_text_pretrained(str(parts / "clip"), str(parts / "llama"), **small).eval()
    processor = processor_cls.from_vision_text_pretrained(str(parts / "clip"), str(parts / "llama"), model.config)
    lm_state = AutoModelForCausalLM.from_pretrained(parts / "llama").state_dict()
    ours = causal_lm_state_dict(model)
    for key, value in lm_state.items():  # pretrained LM weights kept (Flamingo grows the embeddings by 2 rows)
        assert torch.equal(ours[key][: value.shape[0]], value), key
    inputs = processor(images=[random_image(0)], text=["USER: <image>\nwhat is shown ? ASSISTANT:"],
                       return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == model.config.num_image_tokens()
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
