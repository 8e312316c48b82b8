"""`vlm-fusion evaluate retrieval`: LAVIS's image-text retrieval evaluation of a stage-1 Q-Former checkpoint."""

import os

from .common import fail, load_failure, positive_int, quiet, resolve_model


def add_arguments(p) -> None:
    evaluations = p.add_subparsers(dest="evaluation", required=True)
    p = evaluations.add_parser(
        "retrieval", help="image-text retrieval R@1/5/10 of a stage-1 Q-Former checkpoint, by LAVIS's procedure",
        description="LAVIS's BLIP-2 retrieval evaluation: ITC similarity for every image-caption pair, ITM re-ranking "
                    "of each image's top k captions and each caption's top k images, then R@1/5/10 both ways, printed "
                    "and written as JSON under LAVIS's key names (txt_r1 ... r_mean, agg_metrics).")
    p.add_argument("--model", required=True, help="a stage-1 Q-Former checkpoint (model_type fusion_blip2_qformer)")
    p.add_argument("--data", required=True, help="image-caption samples, in any format `vlm-fusion train` reads; the "
                   "caption is the assistant turn; an image in several samples is one image with several captions")
    p.add_argument("--image-folder", help="the folder LLaVA-format image paths are relative to")
    p.add_argument("--k", type=positive_int, default=128, help="candidates ITM re-ranks per image and per caption, "
                   "the best by ITC (LAVIS's k_test; capped at the number of candidates)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images, captions or image-caption pairs per "
                   "forward pass")
    p.add_argument("--output", metavar="FILE.json", help="where to write the metrics (default: "
                   "<model>/retrieval_results.json)")


def run(args) -> int:
    return {"retrieval": evaluate_retrieval}[args.evaluation](args)


def evaluate_retrieval(args) -> int:
    import json  # lazy, as every import of vlm_fusion here: import time

    from tqdm.auto import tqdm

    from vlm_fusion.evaluation import retrieval
    from vlm_fusion.training import DataError

    try:
        path = resolve_model(args.model)
    except ValueError as error:
        return fail(str(error))
    if os.path.isdir(path):  # a Hub id may still need the network
        quiet()
    try:
        retrieval.check_model_type(path)  # before the data: one line, in a moment
        samples = retrieval.read_samples(args.data, args.image_folder)
    except DataError as error:
        return fail(f"evaluate retrieval: {error}")
    try:
        model, processor = retrieval.load(path)
    except Exception as error:  # any reason a checkpoint does not load is one line here
        return fail(load_failure(path, error))
    metrics = retrieval.evaluate(model, processor, samples, k=args.k, batch_size=args.batch_size, progress=tqdm)
    output = args.output or os.path.join(path if os.path.isdir(path) else ".", "retrieval_results.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    setup = {"model": args.model, "data": args.data, "images": len(samples.images), "texts": len(samples.texts),
             "k_test": args.k}
    with open(output, "w", encoding="utf-8") as f:
        json.dump({**metrics, "setup": setup}, f, indent=2)
    print("vlm-fusion evaluate retrieval: "
          + retrieval.report(metrics, images=len(samples.images), texts=len(samples.texts), k=args.k))
    print(f"written to {output}")
    return 0
