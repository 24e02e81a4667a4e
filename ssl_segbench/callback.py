"""Evaluation inside a training loop: `evaluate_every(n, ...)` gives a plain callable to call once per epoch, and
`SegbenchCallback` (only where Lightning is installed: `pip install 'ssl-segbench[lightning]'`) does the same from a
Lightning Trainer, logging the metrics to the trainer's loggers.

Every N-th epoch the model is benchmarked through `api.evaluate` (its identity the state dict's digest, so each epoch
gets its own record), by default with `cache=False`: an epoch's features are never read again, so none is kept.
"""
from __future__ import annotations

import functools
import importlib

from .api import Results, evaluate
from .extras import require
from .runner import RunOptionsError

__all__ = ["EvaluateEvery", "evaluate_every"]  # and SegbenchCallback, built on first use (`__getattr__`)


class EvaluateEvery:
    """`hook(model, epoch)` runs `evaluate(model, **options)` after every `every`-th epoch (epochs counted from 0, so
    epochs every-1, 2·every-1, ...), passes the flat metrics to `log(metrics, step=epoch)` where given, and returns the
    results; on the other epochs it returns None. `history` keeps each evaluation's (epoch, results)."""

    def __init__(self, every: int, log=None, prefix: str = "segbench", **options):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise RunOptionsError(f"evaluate_every({every!r}): the interval is a number of epochs, at least 1")
        self.every, self.log, self.prefix = every, log, prefix
        self.options = {"cache": False, **options}
        self.history: list[tuple[int, Results]] = []

    def due(self, epoch: int) -> bool:
        return (epoch + 1) % self.every == 0

    def __call__(self, model, epoch: int) -> Results | None:
        if not self.due(epoch):
            return None
        results = evaluate(model, **self.options)
        self.history.append((epoch, results))
        if self.log is not None:
            self.log(results.metrics(self.prefix), step=epoch)
        return results


def evaluate_every(every: int, log=None, prefix: str = "segbench", **options) -> EvaluateEvery:
    """A hook for a training loop that benchmarks the model every `every` epochs; `options` are `evaluate`'s
    (dataset, protocols, seeds, ...; cache=False unless given)."""
    return EvaluateEvery(every, log, prefix, **options)


def on_epoch_end(hook: EvaluateEvery, trainer, pl_module, model_of) -> Results | None:
    """What `SegbenchCallback` does at a train epoch's end: on rank 0 of a due epoch, evaluate `model_of(pl_module)`
    and log the metrics to every logger of the trainer at its global step."""
    if not hook.due(trainer.current_epoch) or not trainer.is_global_zero:
        return None
    results = hook(model_of(pl_module), trainer.current_epoch)
    for logger in trainer.loggers:
        logger.log_metrics(results.metrics(hook.prefix), step=trainer.global_step)
    return results


def _lightning():
    """Lightning's module: `lightning.pytorch`, or the older `pytorch_lightning` where that is what is installed."""
    try:
        return importlib.import_module("pytorch_lightning")
    except ImportError:
        return require("lightning.pytorch", "ssl_segbench.callback.SegbenchCallback")


@functools.cache
def _callback_class():
    """The Lightning Callback, built on first use so that Lightning stays an optional import."""
    pl = _lightning()

    class SegbenchCallback(pl.Callback):
        """Benchmark `model_of(pl_module)` (default: the LightningModule itself; e.g. `lambda m: m.teacher` for a
        DINO-style module) every `every_n_epochs` train epochs, logging the metrics to the trainer's loggers."""

        def __init__(self, every_n_epochs: int = 1, model_of=lambda module: module, prefix: str = "segbench",
                     **options):
            super().__init__()
            self.hook, self.model_of = EvaluateEvery(every_n_epochs, None, prefix, **options), model_of

        def on_train_epoch_end(self, trainer, pl_module):
            on_epoch_end(self.hook, trainer, pl_module, self.model_of)

    return SegbenchCallback


def __getattr__(name: str):
    if name == "SegbenchCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
