"""Fine-tuning the way VLM users do it: TRL's `SFTTrainer` on conversational image data, and PEFT LoRA on the LM."""

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForImageTextToText
from trl import SFTConfig, SFTTrainer

from conftest import random_image
from vlm_fusion import FAMILIES
from vlm_fusion.tools.tiny import tiny_model_and_processor

SMALL = {"fusion_llava": {}, "fusion_blip2": {}, "fusion_flamingo": dict(num_latents=4, perceiver_depth=1)}


def conversations(n=8):
    """TRL's conversational image format: `messages` with `{"type": "image"}` parts, and `images`."""
    return Dataset.from_list([
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is shown ?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": f"a {c} circle"}]}],
         "images": [random_image(i)]}
        for i, c in zip(range(n), ["red", "blue", "green", "yellow"] * n)
    ])


def train(model, processor, output_dir, steps=3):
    args = SFTConfig(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
                     report_to=[], logging_steps=1, save_strategy="no", max_length=None, bf16=False, use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=conversations(), processing_class=processor)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sft_trainer_trains_every_family(family, tmp_path):
    torch.manual_seed(0)
    model, processor = tiny_model_and_processor(family, "clip", "llama", **SMALL[family])
    bridge = {name: [p.detach().clone() for p in module.parameters()] for name, module in model.bridge_modules().items()}
    losses = train(model, processor, tmp_path)
    print(f"{family}: SFTTrainer losses {[round(loss, 3) for loss in losses]}")
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    for name, module in model.bridge_modules().items():
        assert any(not torch.equal(a, b) for a, b in zip(bridge[name], module.parameters())), f"{name} did not train"


def test_lora_on_the_language_model_trains_and_reloads(tmp_path):
    torch.manual_seed(0)
    model, processor = tiny_model_and_processor("fusion_llava", "clip", "llama")
    model.save_pretrained(tmp_path / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    peft_model = get_peft_model(model, lora)
    adapters = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert adapters and all("language_model" in n for n in adapters)
    losses = train(peft_model, processor, tmp_path / "run")
    print(f"LoRA: SFTTrainer losses {[round(loss, 3) for loss in losses]}")
    assert any(not torch.equal(p, adapters[n]) for n, p in peft_model.named_parameters() if n in adapters)
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tmp_path / "base"),
                                         tmp_path / "adapter").eval()
    peft_model.eval()
    inputs = processor(images=[random_image(0)], text=["USER: <image>\nwhat is shown ? ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, peft_model(**inputs).logits)
