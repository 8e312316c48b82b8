"""Watching a run: live through transformers' own reporting integrations (`--report-to tensorboard|wandb`), and
afterwards as `loss.png` beside the saved model, drawn from the Trainer's log history.

    --report-to  ->  TrainingArguments.report_to  ->  transformers' TensorBoardCallback / WandbCallback
                     (TensorBoard: event files in <output_dir>/runs/<date>_<host>, one folder per start or resume)
    trainer.state.log_history  ->  training loss against step (+ eval_loss, when the run evaluates)  ->  loss.png

Everything a callback logs reaches the integration, so the Q-Former stage's loss_itc / loss_itm / loss_itg do too.
A missing integration package stops the run before anything loads; a missing matplotlib only skips the picture.
"""

import importlib.util

from transformers.utils import logging

from .data import DataError

logger = logging.get_logger("vlm_fusion.training")

# --report-to value -> the packages that provide it (any one will do) and what to install
REPORTERS = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb")}
LOSS_CURVE = "loss.png"


def report_to(name: str) -> list[str]:
    """`TrainingArguments.report_to` for `--report-to NAME`; raises (one line) if NAME's package is not installed."""
    if name == "none":
        return []
    if name not in REPORTERS:
        raise DataError(f"--report-to must be one of {', '.join(REPORTERS)}, none; got {name!r}")
    modules, package = REPORTERS[name]
    if not any(importlib.util.find_spec(module) for module in modules):
        raise DataError(f"--report-to {name} needs the {package} package, which is not installed: "
                        f"pip install {package}")
    return [name]


def loss_curves(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The curves `loss.png` draws: (step, loss) of the training loss and of `eval_loss`, those the run logged."""
    curves = {"training loss": [(entry["step"], entry["loss"]) for entry in log_history
                                if "loss" in entry and "step" in entry],
              "eval loss": [(entry["step"], entry["eval_loss"]) for entry in log_history
                            if "eval_loss" in entry and "step" in entry]}
    return {name: points for name, points in curves.items() if points}


def loss_figure(log_history: list[dict]):
    """A matplotlib `Figure` of the loss curves, each logged point marked (a short run's few points stay visible);
    `None` when there is nothing to draw. Raises ImportError without matplotlib."""
    curves = loss_curves(log_history)
    if not curves:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)  # the Agg canvas: no display, no pyplot state
    axes = figure.add_subplot()
    for name, points in curves.items():
        axes.plot(*zip(*points), "o-", markersize=3, label=name)
    axes.set(xlabel="step", ylabel="loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def plot_losses(log_history: list[dict], path: str) -> bool:
    """Training loss against step (and `eval_loss`, if logged) as a PNG at `path`; `False` (with a warning) when there
    is nothing to draw or matplotlib is not installed."""
    if not loss_curves(log_history):
        return False
    try:
        figure = loss_figure(log_history)
    except ImportError:
        logger.warning("matplotlib is not installed: no %s (pip install matplotlib)", LOSS_CURVE)
        return False
    figure.savefig(path)
    return True
