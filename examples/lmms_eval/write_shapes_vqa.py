"""Write the demo's held-out shapes questions as a local lmms-eval task (the items of the README's accuracy table):

    python examples/lmms_eval/write_shapes_vqa.py                # examples/lmms_eval/shapes_vqa_data, 200 per type
    lmms-eval --model vlm_fusion --model_args pretrained=$(python -c 'import vlm_fusion.demo as d; print(d.checkpoint("llava"))') \\
        --tasks shapes_vqa --include_path examples/lmms_eval --batch_size 8 --output_path lmms_results

The data set is `vlm_fusion.demo.shapes.examples(12345, 4 * per_kind)` — what `vlm_fusion.demo.train.evaluate`
scores — saved with `datasets`' `save_to_disk` (one `test` split: image, kind, question, answer); `shapes_vqa.yaml`
beside this script reads it from `--out` (relative to where lmms-eval runs: the repository's root).
"""

import argparse
import os

from datasets import Dataset, DatasetDict

from vlm_fusion.demo import shapes


def write(out: str, per_kind: int = 200, seed: int = 12345) -> str:
    items = shapes.examples(seed, per_kind * len(shapes.QUESTION_TYPES))
    rows = [{"image": image, "kind": kind, "question": question, "answer": answer}
            for image, kind, question, answer in items]
    DatasetDict({"test": Dataset.from_list(rows)}).save_to_disk(out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "shapes_vqa_data"))
    parser.add_argument("--per-kind", type=int, default=200, help="questions per type (the README's table: 200)")
    args = parser.parse_args(argv)
    print(f"wrote {4 * args.per_kind} questions to {write(args.out, args.per_kind)}")


if __name__ == "__main__":
    main()
