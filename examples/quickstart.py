# Build a tiny LLaVA-style model (CLIP vision tower + Llama LM) from configs, save it, load it back through
# transformers' Auto classes and generate. Random weights: the answer is noise, the plumbing is real.
import numpy as np
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import vlm_fusion  # registers fusion_llava with the Auto* classes
from vlm_fusion.tools.tiny import tiny_model_and_processor

model, processor = tiny_model_and_processor("fusion_llava", vision="clip", text="llama")
model.save_pretrained("tiny-fusion-llava")
processor.save_pretrained("tiny-fusion-llava")

model = AutoModelForImageTextToText.from_pretrained("tiny-fusion-llava")
processor = AutoProcessor.from_pretrained("tiny-fusion-llava")
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
inputs = processor(images=image, text="USER: <image>\nwhat is shown ? ASSISTANT:", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
print(type(model).__name__, "sees", int((inputs["input_ids"] == processor.image_token_id).sum()), "visual tokens")
print(processor.batch_decode(out, skip_special_tokens=True))
