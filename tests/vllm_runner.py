"""Runs vLLM engines one after another in one process (started by tests/test_vllm.py): for each job, `LLM(model=...)`
and greedy generation on its requests (each may set its own `max_tokens`); writes each job's token ids, or the error
that stopped its engine or its requests, as JSON. A request's clips are `.npy` files `(frames, height, width,
channels)`, handed to vLLM with their metadata (as its video loader does), so the model's video processor samples
their frames as in transformers.

    python vllm_runner.py JOBS.json RESULTS.json
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: seconds, not a minute
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default asks for 92% of the machine's memory
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def data_url(path) -> str:
    import base64

    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def clip(path, fps=8.0):
    import numpy as np

    frames = np.load(path)
    return frames, {"fps": fps, "duration": len(frames) / fps, "total_num_frames": len(frames),
                    "frames_indices": list(range(len(frames))), "video_backend": "pyav", "do_sample_frames": True}


def main(jobs_file, results_file):
    from PIL import Image
    from vllm import LLM, SamplingParams

    results = {}
    for job in json.load(open(jobs_file)):
        try:
            llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
                      limit_mm_per_prompt=job.get("limits", {"image": job.get("max_images", 1)}), **job.get("llm", {}))
        except Exception as error:  # the refusal a test expects, or what went wrong
            results[job["name"]] = {"error": f"{type(error).__name__}: {error}"}
            continue
        sampling = SamplingParams(temperature=0.0, max_tokens=job.get("max_tokens", 8))
        prompts = []
        for r in job["requests"]:  # a prompt as text, or as the token ids a processor gave
            prompt = {"prompt_token_ids": r["prompt_ids"]} if "prompt_ids" in r else {"prompt": r["prompt"]}
            if r["images"]:
                prompt["multi_modal_data"] = {"image": [Image.open(p).convert("RGB") for p in r["images"]]}
            if r.get("videos"):
                prompt.setdefault("multi_modal_data", {})["video"] = [clip(p) for p in r["videos"]]
            prompts.append(prompt)
        per_request = [SamplingParams(temperature=0.0, max_tokens=r.get("max_tokens", sampling.max_tokens))
                       for r in job["requests"]]
        try:
            outputs = llm.generate(prompts, per_request)
        except Exception as error:  # a request the engine refuses
            results[job["name"]] = {"error": f"{type(error).__name__}: {error}"}
            del llm
            continue
        if job.get("chat"):  # the same questions as chats: vLLM applies the model's chat template itself
            conversations = [[{"role": "user", "content": [
                *[{"type": "image_url", "image_url": {"url": data_url(p)}} for p in r["images"]],
                {"type": "text", "text": r["question"]}]}] for r in job["chat"]]
            outputs = outputs + llm.chat(conversations, sampling)
        results[job["name"]] = {"tokens": [list(o.outputs[0].token_ids) for o in outputs],
                                "prompt_tokens": [list(o.prompt_token_ids) for o in outputs]}
        del llm
    json.dump(results, open(results_file, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
