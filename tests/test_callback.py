"""Issue 23, the callback: `evaluate_every` inside a 2-epoch toy DINO-style training loop logs the metrics each time,
gives one record per state dict and leaves the cache folder empty; the Lightning callback logs to the trainer's
loggers (tested with a fake trainer; its class needs Lightning, and without it is refused naming the extra). The
README's two examples run here as they are printed."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import ssl_segbench
from ssl_segbench import callback
from ssl_segbench.extras import MissingExtraError
from ssl_segbench.records import iter_records
from ssl_segbench.runner import RunOptionsError


def _toy_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True,
                             img_size=64, embed_dim=32, depth=2, num_heads=2)


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example(name: str, data) -> dict:
    """Run the README's python block marked `<!-- example: NAME ... -->` as printed, with `DATA` bound to the dataset
    folder; its variables come back."""
    text = README.read_text()
    after = text[text.index(f"<!-- example: {name} "):]
    code = after[after.index("```python\n") + len("```python\n"): after.index("\n```\n")]
    namespace = {"DATA": data}
    exec(compile(code, f"README.md ({name} example)", "exec"), namespace)  # noqa: S102 - the README's own example
    return namespace


def readme_api_example(DATA):  # noqa: N803 - the README's name for the dataset folder
    return readme_example("api", DATA)["res"]


def readme_callback_example(DATA):  # noqa: N803
    return readme_example("callback", DATA)["hook"]


def test_readme_api_example_runs(small_synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_SEGBENCH_RESULTS", str(tmp_path / "res"))
    res = readme_api_example(small_synthetic)
    assert set(res) == {"kmeans", "linear"} and res["linear"].record.protocol["params"]["epochs"] == 2
    assert len(list((tmp_path / "res").rglob("*.json"))) == 2


def test_the_hook_in_a_two_epoch_training_loop_logs_each_time_gives_two_records_and_caches_nothing(
        small_synthetic, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SSL_SEGBENCH_RESULTS", str(tmp_path / "res"))
    monkeypatch.setenv("SSL_SEGBENCH_CACHE", str(tmp_path / "cache"))
    hook = readme_callback_example(small_synthetic)
    logged = [line for line in capsys.readouterr().out.splitlines() if "segbench/kmeans/miou" in line]
    assert [line.split()[0] for line in logged] == ["0", "1"]  # logged after each epoch, at its step
    assert [epoch for epoch, _ in hook.history] == [0, 1]
    records = [rec for _, rec in iter_records(tmp_path / "res")]
    assert len(records) == 2 and len({r.backbone["revision_resolved"] for r in records}) == 2  # two state dicts
    assert {r.key for r in records} == {res["kmeans"].record.key for _, res in hook.history}
    for epoch, res in hook.history:  # what was logged is the record's number
        assert f"'segbench/kmeans/miou': {res['kmeans'].miou}" in logged[epoch]
    assert not (tmp_path / "cache").exists()


def test_the_hook_runs_on_every_nth_epoch_only(small_synthetic, tmp_path):
    model, seen = _toy_vit(), []
    hook = callback.evaluate_every(2, log=lambda m, step: seen.append((step, sorted(m))), dataset="synthetic",
                                   data_root=small_synthetic, protocols=["kmeans"], seeds=1, size=64,
                                   write_records=False)
    assert [hook(model, epoch) is None for epoch in range(4)] == [True, False, True, False]
    assert seen == [(step, ["segbench/kmeans/miou", "segbench/kmeans/pixel_acc"]) for step in (1, 3)]
    with pytest.raises(RunOptionsError, match="at least 1"):
        callback.evaluate_every(0)


class _Logger:
    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, step):
        self.calls.append((step, metrics))


class _Trainer:
    def __init__(self, epoch, zero=True):
        self.current_epoch, self.is_global_zero, self.global_step = epoch, zero, 10 * (epoch + 1)
        self.loggers = [_Logger(), _Logger()]


class _Module(torch.nn.Module):  # a DINO-style LightningModule: the teacher is what is benchmarked
    def __init__(self):
        super().__init__()
        self.teacher = _toy_vit()


def test_the_lightning_logic_logs_to_every_logger_of_the_trainer_on_rank_zero(small_synthetic):
    hook = callback.EvaluateEvery(1, dataset="synthetic", data_root=small_synthetic, protocols=["kmeans"], seeds=1,
                                  size=64, write_records=False)
    trainer, module = _Trainer(0), _Module()
    res = callback.on_epoch_end(hook, trainer, module, lambda m: m.teacher)
    expected = {"segbench/kmeans/miou": res["kmeans"].miou, "segbench/kmeans/pixel_acc": res["kmeans"].pixel_acc}
    assert [logger.calls for logger in trainer.loggers] == [[(10, expected)]] * 2
    other = _Trainer(0, zero=False)  # another rank of a data-parallel run: rank 0 evaluates and logs
    assert callback.on_epoch_end(hook, other, module, lambda m: m.teacher) is None and not other.loggers[0].calls


def test_the_lightning_callback_is_a_callback_where_lightning_is_installed_else_names_the_extra():
    if importlib.util.find_spec("lightning") or importlib.util.find_spec("pytorch_lightning"):
        cls = callback.SegbenchCallback
        base = callback._lightning().Callback
        assert issubclass(cls, base) and cls(2).hook.every == 2
    else:
        with pytest.raises(MissingExtraError, match=r"SegbenchCallback needs lightning.*ssl-segbench\[lightning\]"):
            callback.SegbenchCallback  # noqa: B018 - the attribute builds the class


def test_the_package_exports_the_callback_module():
    assert ssl_segbench.callback is callback
