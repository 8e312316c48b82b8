"""The lmms-eval plugin: `lmms-eval --model vlm_fusion --model_args pretrained=DIR --tasks ...` for any vlm-fusion model.

lmms-eval reads `manifest` through the `lmms_eval.models` entry point (`pyproject.toml`) and builds the chat model
`vlm_fusion.integrations.lmms_eval_model.VLMFusion` (imported by lmms-eval only): a task's messages go through the
model's own chat template and processor (Flamingo's images nested per sample, BLIP-2's query placeholders, LLaVA's
patches), a task's clips (`{"type": "video", "url": ...}` parts) go to the processor's `videos=`, flat and in order,
when it has a video processor (refused in one line when not), batches are left-padded, decoding is greedy unless the
task's `generation_kwargs` say otherwise.

Model args: `pretrained` (a vlm-fusion checkpoint folder or Hub id), `device` (default: the GPU if there is one),
`dtype` (`auto`: the checkpoint's), `device_map` (e.g. `auto`, instead of `device`), `max_new_tokens` (when the task
gives none; 256), `trust_remote_code` (a checkpoint saved with `remote_code=True`, vlm-fusion not needed to run it).
"""


def manifest():
    """What lmms-eval registers under `--model vlm_fusion` (a chat model: generation tasks)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlm_fusion", chat_class_path="vlm_fusion.integrations.lmms_eval_model.VLMFusion")
