"""The shapes_vqa task's functions: one image and its question per document; a whole-answer exact match."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_messages(doc, lmms_eval_specific_kwargs=None):
    """The question as a chat turn: the image, then the text (the model's chat template lays them out)."""
    return [{"role": "user", "content": [{"type": "image", "url": doc["image"].convert("RGB")},
                                         {"type": "text", "text": doc["question"]}]}]


def process_results(doc, results):
    """Exact match of the whole answer (for left_of, its reasoning too), overall and under the question's type."""
    right = float(results[0].strip() == doc["answer"])
    return {"exact_match": right, doc["kind"]: right}
