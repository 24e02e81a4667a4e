"""Typed protocol parameters (issue 22): each protocol's parameters are a frozen dataclass (`Protocol.Params`), checked
once when the protocol is made; `params` stays the plain dict the record stores, with the same keys, order and values
as before the change, and protocol code reads the typed `p`, so a mistyped name is caught by the test below that
every `p.<name>` in protocols/*.py names a field."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest

from ssl_segbench.cli import main
from ssl_segbench.protocols import PROTOCOLS, Protocol, ProtocolError, get_protocol
from ssl_segbench.protocols.base import SharedParams, param_rules
from ssl_segbench.protocols.training import TrainingParams
from ssl_segbench.records import iter_records

# The defaults as main declared them before the change (`SHARED_DEFAULTS` then each protocol's `defaults`, a key the
# protocol redefines keeping its shared place): the record's params must keep these keys, this order and these values
# (with their types: 5 is not 5.0).
_SHARED = {"resize": None, "size": None, "eval_size": None, "crf": False, "crf_temperature": 1.0}
_KMEANS = {**_SHARED, "k": None, "standardize": False, "pca_dim": None, "l2_normalize": True, "spherical": True,
           "niter": 100, "nredo": 5, "max_points_per_centroid": None, "max_fit_points": 2_000_000,
           "upsample": "bilinear", "matching": "hungarian-pixels", "crf_temperature": 0.5, "kmeans_backend": "auto"}
REFERENCE = {
    "kmeans": _KMEANS,
    "overcluster": {**_KMEANS, "k": 500, "matching": "many-to-one"},
    "linear": {**_SHARED, "variant": "cached-features", "train_split": "default", "epochs": 25, "lr": 0.01,
               "momentum": 0.9, "weight_decay": 1e-4, "lr_step": 20, "batch_size": 60, "train_size": 100,
               "upsample": "bilinear", "aug_scale": [0.8, 1.0], "aug_ratio": [0.75, 4 / 3], "aug_flip": 0.5},
    "retrieval": {**_SHARED, "k": 30, "temperature": 0.02, "memory_size": None, "ignore": "drop", "matching": "none",
                  "augment": 0, "aug_seed": 0, "aug_scale": [0.5, 2.0], "aug_ratio": [0.75, 4 / 3],
                  "aug_jitter": 0.1, "aug_jitter_p": 0.5, "index": "exact", "ivf_lists": 1024, "ivf_probe": 32,
                  "hnsw_m": 32, "hnsw_ef": 128, "train_split": "default", "upsample": "bilinear",
                  "size_fit": "exact", "crf_temperature": 0.1},
    "datus": {**_SHARED, "k": None, "key_centering": "image-mean", "tau": 5, "louvain_resolution": 1.0,
              "louvain_seed": 0, "crop_resize": 256, "crop_size": 224, "pca_dim": None, "n_init": 10,
              "matching": "auto", "mask_confidence": 0.7},
    "maskdistill": {**_SHARED, "stage": "pseudo", "cls_map": "softmax", "heads": 5, "mass": 0.5, "topk": 0.4,
                    "proposals": "topk", "connectivity": 4, "center_keys": True, "embed_backbone": None,
                    "crop_size": None, "fit_set": "all", "whiten": "std", "k": None, "overcluster": 1,
                    "kmeans_batch_size": 1000, "kmeans_n_init": 3, "background_class": 0, "matching": "auto",
                    "upsample": "auto", "epochs": 25, "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4,
                    "lr_step": 20, "batch_size": 60, "train_size": 100, "conv_hidden": 256, "mask_confidence": 0.7},
    "fs4": {**_SHARED, "k": None, "cae": True, "cae_radius": 2, "cae_threshold": 0.5, "cae_temperature": 0.1,
            "pgg": True, "pyramid_levels": [1, 2, 4], "temperature": 0.1, "pgg_prior": 1.0, "pgg_weight": 1.0,
            "rounds": 3, "cluster_iters": 10, "steps": 100, "batch_size": 8, "lr": 1e-3, "niter": 100, "nredo": 5,
            "max_fit_points": 2_000_000, "kmeans_backend": "auto", "upsample": "bilinear", "matching": "auto"},
    "linear-dinov2": {**_SHARED, "resize": "pad", "variant": "augmented", "train_split": ["trainaug", "default"],
                      "layers": 1, "head_dropout": 0.0, "head_init_std": 0.01, "lr": 1e-3, "weight_decay": 1e-4,
                      "betas": [0.9, 0.999], "schedule": "poly", "poly_power": 1.0, "min_lr": 0.0,
                      "warmup_iters": 1500, "warmup_ratio": 1e-6, "iterations": 40000, "batch_size": 16,
                      "loss_average": "all-pixels",
                      "img_scale": {"ade20k": [99999999, 512], "voc": [2048, 512], "cityscapes19": [2048, 1024],
                                    "*": [99999999, 512]},
                      "ratio_range": [0.5, 2.0], "crop_size": 512, "cat_max_ratio": 0.75, "flip": 0.5,
                      "photometric": "mmseg", "slide_crop": 512, "slide_stride": 341, "tta_ratios": [1.0],
                      "tta_flip": False},
    "leopart-cd": {**_SHARED, "eval_size": 100, "fit_splits": "eval+train", "standardize": True, "pca_dim": 50,
                   "max_fit_points": 2_000_000, "niter": 100, "nredo": 5, "max_points_per_centroid": None,
                   "cluster_seed": 0, "kmeans_backend": "auto", "attn_blur_kernel": 7, "attn_blur_sigma": 0.6,
                   "attn_mass": 0.65, "attn_drop_upto": 2, "cbfe_k": 200, "cbfe_threshold": 0.5, "k": None,
                   "markov_time": None, "weight_threshold": None, "preferred_modules": None, "distances": [1, 2],
                   "matching": "hungarian-iou", "isolated_clusters": "own-label", "unmatched": "wrong",
                   "background_class": 0, "mask_confidence": 0.7},
    "stego": {**_SHARED, "resize": "shorter", "size": 320, "probe": "cluster", "selection": "final", "val_every": 100,
              "train_split": "default", "crop_type": "five", "crop_ratio": 0.5, "train_res": 224, "dim": 70,
              "dropout": 0.1, "drop_loss_features": True, "feature_samples": 11, "neg_samples": 5, "pointwise": True,
              "pos_intra_weight": 0.67, "pos_intra_shift": 0.18, "pos_inter_weight": 0.25, "pos_inter_shift": 0.12,
              "neg_inter_weight": 0.63, "neg_inter_shift": 0.46, "knn_top": 30, "num_neighbors": 7, "lr": 5e-4,
              "probe_lr": 5e-3, "steps": 5000, "batch_size": 16, "flip_average": True},
}


# Parameters added after records existed (`base.added_param`), at the end of their protocol's parameters: the record
# lists them, the Setting (so the key) leaves them out at these defaults, which are the behaviour measured before
ADDED = {"linear": {"slide_crop": None, "slide_stride": None},
         "retrieval": {"slide_crop": None, "slide_stride": None}}


def _items(d: dict) -> list[tuple[str, str]]:
    """Keys in order with each value's repr, so that 5 and 5.0, or 1 and True, differ."""
    return [(k, repr(v)) for k, v in d.items()]


def _made():
    """(spec, protocol) for every registered protocol and each of its presets."""
    for name, cls in sorted(PROTOCOLS.items()):
        for preset in (None, *cls.presets):
            spec = name if preset is None else f"{name}:{preset}"
            yield spec, get_protocol(spec)


def test_params_keep_the_keys_order_and_values_declared_before_the_change():
    assert sorted(REFERENCE) == sorted(PROTOCOLS)
    for spec, proto in _made():
        name, _, preset = spec.partition(":")
        expected = {**REFERENCE[name], **(proto.presets[preset] if preset else {})}
        assert _items(proto.params) == _items({**expected, **ADDED.get(name, {})}), spec
        assert _items(type(proto).identity_params(proto.params)) == _items(expected), spec
        assert _items(type(proto).all_defaults()) == _items({**REFERENCE[name], **ADDED.get(name, {})}), name


def test_the_typed_object_equals_the_plain_params_for_every_protocol_and_preset():
    for spec, proto in _made():
        for made in (proto, proto.for_device("cpu")):
            assert type(made.p) is type(proto).Params and isinstance(made.p, SharedParams), spec
            assert _items(dataclasses.asdict(made.p)) == _items(made.params), spec
    resolved = get_protocol("kmeans").for_device("cpu")  # a resolver's concrete value reaches both
    assert resolved.params["kmeans_backend"] == resolved.p.kmeans_backend != "auto"


def test_the_typed_object_is_frozen_and_a_mistyped_name_is_an_attribute_error():
    p = get_protocol("kmeans", k=3).p
    assert p.k == 3 and p.nredo == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.k = 4
    with pytest.raises(AttributeError):
        p.nredo0  # noqa: B018


def _param_reads(source: str) -> list[tuple[int, str]]:
    """(line, name) of every `p.<name>` / `self.p.<name>` read and every name given to `self.positive` /
    `self.fraction`."""
    reads = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and (
                (isinstance(node.value, ast.Name) and node.value.id == "p")
                or (isinstance(node.value, ast.Attribute) and node.value.attr == "p"
                    and isinstance(node.value.value, ast.Name) and node.value.value.id == "self")):
            reads.append((node.lineno, node.attr))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("positive", "fraction"):
            reads += [(a.lineno, a.value) for a in node.args
                      if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return reads


def _unknown_reads(source: str, fields: set[str]) -> list[str]:
    """The reads of `_param_reads` that name none of `fields`, as 'line: name'."""
    return [f"{line}: {name}" for line, name in _param_reads(source) if name not in fields]


def _module_fields(module) -> set[str]:
    """The fields of the parameters dataclasses a protocol module defines or its protocols use (training.py: what
    `TrainingParams` declares)."""
    own = [obj for obj in vars(module).values() if inspect.isclass(obj) and obj.__module__ == module.__name__]
    types = {c for c in own if issubclass(c, SharedParams)} | {c.Params for c in own if issubclass(c, Protocol)}
    names = {f.name for t in types for f in dataclasses.fields(t)}
    if module.__name__.endswith(".training"):
        names |= set(TrainingParams.__annotations__)
    return names


def test_every_attribute_read_of_the_parameters_names_a_field_of_its_module():
    folder = Path(importlib.import_module("ssl_segbench.protocols").__file__).parent
    checked = 0
    for path in sorted(folder.glob("*.py")):
        if path.name == "__init__.py":
            continue
        module = importlib.import_module(f"ssl_segbench.protocols.{path.stem}")
        fields = _module_fields(module)
        source = path.read_text()
        assert _unknown_reads(source, fields) == [], path.name
        checked += len(_param_reads(source))
    assert checked > 300  # the reads were found (357 when this test was written)
    # the check sees a typo: a planted read of a name no dataclass declares
    assert _unknown_reads("def f(p):\n    return p.nredo0 + p.nredo\n", {"nredo"}) == ["2: nredo0"]
    assert _unknown_reads("class A:\n    def check(self):\n        self.positive('nred0')\n", {"nredo"}) \
        == ["3: nred0"]


def _keyed_reads(source: str) -> list[int]:
    """Lines that index the parameters by key (`p[...]`, `self.p[...]`, `self.params[...]`): a protocol module reads
    the typed object by attribute (base.py, which keeps the plain dict for records and resolvers, is not checked)."""
    def is_params(node) -> bool:
        return (isinstance(node, ast.Name) and node.id == "p") or (
            isinstance(node, ast.Attribute) and node.attr in ("p", "params")
            and isinstance(node.value, ast.Name) and node.value.id == "self")

    return [n.lineno for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Subscript) and is_params(n.value)]


def test_no_protocol_module_reads_its_parameters_by_key():
    folder = Path(importlib.import_module("ssl_segbench.protocols").__file__).parent
    for path in sorted(folder.glob("*.py")):
        if path.name != "base.py":
            assert _keyed_reads(path.read_text()) == [], path.name
    assert _keyed_reads('def f(self, p):\n    return p["k"], self.params["k"], p.k\n') == [2, 2]


def test_training_helpers_read_only_fields_both_training_protocols_have():
    for cls in (PROTOCOLS["linear"].Params, PROTOCOLS["maskdistill"].Params):
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        assert {k: hints.get(k) for k in TrainingParams.__annotations__} == TrainingParams.__annotations__, cls


@pytest.mark.parametrize("spec, overrides, message", [
    # choices from Literal[...], in declaration order; a choice matches its type exactly (4.0 is not 4)
    ("linear", {"upsample": "bicubic"}, "linear: upsample must be one of ('bilinear', 'nearest'), got 'bicubic'"),
    ("maskdistill", {"connectivity": 4.0}, "maskdistill: connectivity must be one of (4, 8), got 4.0"),
    ("maskdistill", {"whiten": "zca"}, "maskdistill: whiten must be one of ('std', 'pca', None), got 'zca'"),
    ("overcluster", {"matching": "hungarian-pixels"},
     "overcluster: matching must be one of ('many-to-one',), got 'hungarian-pixels'"),
    ("fs4", {"resize": "crop"}, "fs4: resize must be one of (None, 'shorter', 'square', 'pad'), got 'crop'"),
    ("kmeans", {"kmeans_backend": "sklearn"},
     "kmeans: kmeans_backend must be one of ('auto', 'faiss', 'torch'), got 'sklearn'"),
    # types from the annotation: int is never a bool, float takes no str, None only where declared
    ("kmeans", {"k": True}, "kmeans: k must be int or null, got True"),
    ("overcluster", {"k": None}, "overcluster: k must be int, got None"),
    ("datus", {"tau": 5.0}, "datus: tau must be int, got 5.0"),
    ("linear", {"lr": "0.1"}, "linear: lr must be float, got '0.1'"),
    ("linear", {"train_split": 3}, "linear: train_split must be str or list, got 3"),
    ("leopart-cd", {"cbfe_threshold": None}, "leopart-cd: cbfe_threshold must be float or str, got None"),
    ("retrieval", {"crf": "yes"}, "retrieval: crf must be bool or dict, got 'yes'"),
    ("fs4", {"pyramid_levels": (1, 2)}, "fs4: pyramid_levels must be list, got (1, 2)"),
    # the shared ranges and a protocol's own check, after the types
    ("kmeans", {"eval_size": 0}, "kmeans: eval_size must be a positive integer, got 0"),
    ("datus", {"crf_temperature": 0}, "datus: crf_temperature must be > 0, got 0"),
    ("maskdistill", {"mask_confidence": 1.0}, "maskdistill: mask_confidence must be in (0, 1), got 1.0"),
])
def test_wrong_types_and_choices_are_refused_with_the_messages_of_before(spec, overrides, message):
    with pytest.raises(ProtocolError) as e:
        get_protocol(spec, **overrides)
    assert str(e.value) == message


@pytest.mark.parametrize("spec, overrides", [
    ("linear", {"lr": 1}),  # a float parameter takes an int
    ("maskdistill", {"whiten": None, "connectivity": 8, "background_class": None}),
    ("leopart-cd", {"cbfe_threshold": "otsu", "markov_time": 2}),
    ("retrieval", {"train_split": ["trainaug", "default"], "crf": {"iterations": 5}}),
])
def test_values_the_annotations_allow_are_taken_as_given(spec, overrides):
    proto = get_protocol(spec, **overrides)
    for key, value in overrides.items():
        assert proto.params[key] == getattr(proto.p, key) == value
        assert type(proto.params[key]) is type(value)


def test_an_annotation_that_names_no_rule_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Bad(SharedParams):
        levels: list[int] = dataclasses.field(default_factory=list)

    with pytest.raises(TypeError, match=r"Bad\.levels: annotate a parameter with Literal"):
        param_rules(Bad)
    assert param_rules(SharedParams)["resize"] == ("choices", (None, "shorter", "square", "pad"))
    assert param_rules(SharedParams)["size"] == ("types", (int, None))


@pytest.mark.parametrize("param, message", [
    ("maskdistill.connectivity=6", "maskdistill: connectivity must be one of (4, 8), got 6"),
    ("linear.train_split=3", "linear: train_split must be str or list, got 3"),
])
def test_a_refused_param_on_the_command_line_exits_2_and_writes_nothing(small_synthetic, tmp_path, capsys, param,
                                                                        message):
    proto = param.partition(".")[0]
    rc = main(["run", "--backbone", "pixels", "--dataset", "synthetic", "--data-root", str(small_synthetic),
               "--size", "64", "--seeds", "1", "--protocol", proto, "--param", param,
               "--results-dir", str(tmp_path / "res")])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not list(iter_records(tmp_path / "res")) and not (tmp_path / "res").exists()
