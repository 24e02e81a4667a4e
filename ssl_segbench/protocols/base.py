"""Protocol interface and the shared step from per-image scores to a dataset-level confusion matrix.

A protocol has a name, a version (bumped whenever its numbers could change) and a parameter set; named presets
reproduce published settings exactly. Everything in the parameters goes into the record, so two rows are comparable
exactly when their parameters are equal.
"""
from __future__ import annotations

import collections
import copy
import functools
import math
import os
import shutil
import tempfile
import time
import types
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Literal, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import write_bytes_atomic
from ..backbones import Backbone, BackboneRef
from ..cache import ArrayStore
from ..crf import CRFError, CRFParams, pool_map, refine_scores, require_crf
from ..data import SegmentationDataset
from ..errors import SegbenchError
from ..features import FeatureSet, embed
from ..metrics import ConfusionAccumulator, image_stats, remap, scores
from ..paths import PathError, inside, safe_component
from ..progress import progress_bar
from ..registry import is_int, is_number
from ..sliding import slide_logits, windows
from ..transforms import POLICIES, Transform


class ProtocolError(SegbenchError):
    """Bad protocol parameters or inputs; the message names the parameter and the allowed values."""


@dataclass
class Context:
    """What a protocol may use: the datasets, a way to get (cached) features of a split, seeds and the device.

    Every backbone pass a protocol causes is listed in `passes` (what it computed, and whether it came from the cache),
    so a record says exactly which work ran; `ctx.get` records feature passes itself, protocols with a second pass
    (crop embeddings, augmented training) call `record_pass`."""

    eval_set: SegmentationDataset
    train_set: SegmentationDataset | None
    features: Callable[[SegmentationDataset, tuple[str, ...]], FeatureSet]
    seeds: list[int]
    device: str = "cpu"
    info: dict = field(default_factory=dict)  # facts the protocol adds to the record (e.g. which split it trained on)
    passes: list[dict] = field(default_factory=list)
    backbone_ref: BackboneRef | None = None  # for protocols that need a second pass (e.g. CLS of segment crops)
    transform: Transform | None = None  # the geometry the cached features and labels were made with
    save_masks: Path | None = None  # where protocols that make pseudo masks write them (PNG, dataset palette)
    batch_size: int = 16  # images per backbone call in second passes (does not change the numbers)
    layer: int = -1
    train_note: str | None = None  # how the train split was chosen, when the protocol asked for one
    resized_masks: dict = field(default_factory=dict)  # split → names of samples whose mask was resized (labels)
    scoring: Scoring | None = None  # how scores become labels (CRF, device): set by Protocol.run from the parameters
    _backbone: Backbone | None = None

    def backbone(self) -> Backbone:
        """The loaded backbone, loaded once on first use (a cache-only protocol never calls this)."""
        if self._backbone is None:
            if self.backbone_ref is None:
                raise ProtocolError("this protocol needs the backbone itself, but the run gave none")
            self._backbone = self.backbone_ref.load(self.device)
        return self._backbone

    def get(self, dataset: SegmentationDataset, facets: tuple[str, ...]) -> FeatureSet:
        fs = self.features(dataset, facets)
        self.record_pass("features", not fs.cache_hit, split=dataset.split, facets=list(facets),
                         computed_here=list(fs.computed))
        self.resized_masks.setdefault(dataset.split, set()).update(fs.labels.meta.get("resized_masks", ()))
        return fs

    def record_pass(self, kind: str, computed: bool, **facts) -> None:
        """Note one piece of backbone work: `computed` when this run did it, False when it came from the cache."""
        self.passes.append({"kind": kind, "computed": bool(computed), **facts})


@dataclass(frozen=True)
class SharedParams:
    """The parameters of every protocol: the resize policy and input size it fixes (None: the run's), the evaluation
    size (None: label resolution), the dense CRF and its temperature. Each protocol's parameters subclass it, a field
    per parameter (a redefined field keeps its place). A field's annotation is its rule, checked when the protocol is
    made (`param_rules`): `Literal[...]` lists the allowed values; otherwise the allowed types, where None allows
    None, float accepts an int, and bool is never an int."""

    resize: Literal[(None, *POLICIES)] = None
    size: int | None = None
    eval_size: int | None = None
    crf: bool | dict = False
    crf_temperature: float = 1.0


@functools.cache
def param_rules(params_type: type[SharedParams]) -> dict[str, tuple[str, tuple]]:
    """Field name → ('choices', the allowed values) or ('types', the allowed types, None for None) of a parameters
    dataclass, in field order, read from its annotations once per class."""
    hints = get_type_hints(params_type)
    rules = {}
    for f in fields(params_type):
        hint = hints[f.name]
        if get_origin(hint) is Literal:
            rules[f.name] = ("choices", get_args(hint))
            continue
        parts = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
        allowed = tuple(None if t is type(None) else t for t in parts)
        if not all(t is None or (isinstance(t, type) and get_origin(t) is None) for t in allowed):
            raise TypeError(f"{params_type.__name__}.{f.name}: annotate a parameter with Literal[...] or plain types "
                            f"(e.g. int | None), got {hint}")
        rules[f.name] = ("types", allowed)
    return rules


def matching_axis(params: dict) -> str:
    return params["matching"]


def auto_matching(matching: str, k: int, n_classes: int, one_to_one: str = "hungarian-pixels") -> str:
    """`matching` as given, or for 'auto': `one_to_one` (Hungarian) when the K clusters fit the `n_classes` classes,
    else many-to-one (each cluster to its majority class)."""
    if matching != "auto":
        return matching
    return one_to_one if k <= n_classes else "many-to-one"


def kmeans_backend_axis(params: dict) -> str | None:
    """The k-means implementation, named where it is not the default faiss."""
    return None if params["kmeans_backend"] == "faiss" else f"{params['kmeans_backend']} k-means"


ADDED_LATER = "added_later"  # field metadata: see `added_param`


def added_param(default):
    """A parameter field added to a protocol after records of it existed: while it holds `default` (the behaviour the
    older records measured) it stays out of the Setting's parameters, so their keys and columns do not move
    (`Protocol.identity_params`; setting.py's docstring). The default must be that older behaviour."""
    return field(default=default, metadata={ADDED_LATER: True})


def sliding_axis(params: dict) -> str | None:
    """'slide crop/stride' where sliding-window evaluation is on (`slide_crop`, `slide_stride`)."""
    return f"slide {params['slide_crop']}/{params['slide_stride']}" if params.get("slide_crop") else None


def check_sliding(name: str, crop: int | None, stride: int | None, patch_size: int | None = None) -> None:
    """The rules of `slide_crop` / `slide_stride` (both or neither; positive; stride <= crop, else pixels between
    windows go unscored; with the backbone's `patch_size` known, a crop on its patch grid), for every protocol that
    offers sliding-window evaluation (`eval_predictions`)."""
    if (crop is None) != (stride is None):
        raise ProtocolError(f"{name}: slide_crop and slide_stride go together (both set: sliding-window evaluation; "
                            f"neither: whole-image), got slide_crop={crop!r}, slide_stride={stride!r}; set --param "
                            f"{name}.slide_crop=C --param {name}.slide_stride=S, or neither")
    if crop is None:
        return
    for key, v in (("slide_crop", crop), ("slide_stride", stride)):
        if not v > 0:
            raise ProtocolError(f"{name}: {key} must be > 0, got {v!r}")
    if stride > crop:
        raise ProtocolError(f"{name}: slide_stride={stride} exceeds slide_crop={crop}: pixels between windows would "
                            f"get no score; set slide_stride <= {crop}")
    if patch_size is not None and crop % patch_size:
        below, above = crop // patch_size * patch_size, (crop // patch_size + 1) * patch_size
        near = f"{below} or {above}" if below else str(above)
        raise ProtocolError(f"{name}: slide_crop={crop} is not a multiple of the backbone's patch size {patch_size} "
                            f"(windows must cover whole patches); set --param {name}.slide_crop={near}")


def _type_ok(value, allowed: tuple) -> bool:
    for t in allowed:
        if t is None and value is None:
            return True
        if t is bool and isinstance(value, bool):
            return True
        if t is int and is_int(value):
            return True
        if t is float and is_number(value):
            return True
        if t not in (None, bool, int, float) and isinstance(value, t):
            return True
    return False


def _is_choice(value, allowed: tuple) -> bool:
    return any(value is c or (type(value) is type(c) and value == c) for c in allowed)


def _type_name(allowed: tuple) -> str:
    return " or ".join("null" if t is None else t.__name__ for t in allowed)


@dataclass
class ProtocolResult:
    """What a protocol's run returns: per-seed scores (`metrics.scores` plus protocol facts), facts for the record's
    info, the confusion matrices (given as arrays or nested lists, kept as the nested lists a record stores), and the
    (S, N, C, 3) per-image [tp, fp, fn] for bootstrap intervals over images."""

    per_seed: list[dict]
    info: dict = field(default_factory=dict)
    confusions: list | None = None
    image_stats: np.ndarray | None = None

    def __post_init__(self):
        if self.confusions is not None:
            self.confusions = [np.asarray(c).tolist() for c in self.confusions]


class Protocol:
    """A named, versioned protocol. Its parameters are the fields of `Params`, a frozen dataclass subclassing
    `SharedParams` (defaults, and the allowed values or types in the annotations); `check` adds the protocol's own
    range rules. All of it is checked once, when the protocol is made, so a bad value stops a run before any work.
    `params` is the plain dict (what the record stores, presets, resolvers and `--param` act on) and `p` the same
    values as a `Params` instance, which the protocol's code reads (`p.k`: a mistyped name is an AttributeError)."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    Params: ClassVar[type[SharedParams]] = SharedParams
    presets: ClassVar[dict[str, dict]] = {}
    # a name that stands for several presets, each its own column: `--protocol name:group` runs them all
    preset_groups: ClassVar[dict[str, tuple[str, ...]]] = {}
    # parameters whose value 'auto' depends on the machine: name → resolver(value, device) giving the concrete value
    resolvers: ClassVar[dict[str, Callable[[object, str], object]]] = {}
    default_seeds: ClassVar[int] = 1
    # the parameters that name a column in its header, besides the shared ones (geometry, evaluation size, CRF):
    # header axis name → its text from the parameters (None: not shown); `Setting.column` reads them
    axes: ClassVar[dict[str, Callable[[dict], str | None]]] = {}
    # the optional packages (import names, `extras.OPTIONAL`) this protocol imports: the runner checks them while
    # planning (`optional_packages`), so a missing extra is refused before any backbone pass
    requires: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "run" in cls.__dict__:  # an own run would skip check_data and the CRF setting of `Protocol.run`
            raise TypeError(f"{cls.__name__} defines run(); a protocol implements evaluate(ctx), which Protocol.run "
                            "calls")

    def run(self, ctx: Context) -> ProtocolResult:
        """Run this protocol on `ctx`, the one entry point: `crf=true` without the CRF package is refused, then
        `check_data` (for callers other than the runner, which checks while planning), then `ctx.scoring` gets the
        scoring setting of the parameters (CRF, its temperature, the device) that the protocol gives every
        `Predictions` stream, then the protocol's `evaluate`. With the CRF on, the record's `info.crf` says what it
        did, and a run that refined nothing through the stream is refused."""
        try:
            ctx.scoring = Scoring(CRFParams.from_param(self.params["crf"]), float(self.params["crf_temperature"]),
                                  str(ctx.device), (ctx.eval_set, ctx.train_set))
        except CRFError as e:
            raise ProtocolError(f"protocol '{self.name}' with crf=true: {e}") from None
        self.check_data(ctx.eval_set, ctx.train_set, ctx.transform)
        result = self.evaluate(ctx)
        if ctx.scoring.crf is not None:
            result.info["crf"] = ctx.scoring.record(self.name)
        return result

    @classmethod
    def column_axes(cls, params: dict) -> dict[str, str]:
        """The header texts of this protocol's own axes for a column's parameters (`axes`; those a column lacks, as
        records of an older version may, are left out)."""
        out = {}
        for name, text in cls.axes.items():
            try:
                shown = text(params)
            except KeyError:
                continue
            if shown is not None:
                out[name] = shown
        return out

    @classmethod
    def all_defaults(cls) -> dict:
        """Every parameter's default, in field order (the shared ones first)."""
        return {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
                for f in fields(cls.Params)}

    @classmethod
    def identity_params(cls, params: dict) -> dict:
        """`params` as the Setting holds them: without the parameters added after records existed (`added_param`)
        while they hold their default, so the records measured before each was added keep their keys."""
        later = {f.name for f in fields(cls.Params) if f.metadata.get(ADDED_LATER)}
        defaults = cls.all_defaults()
        return {k: v for k, v in params.items()
                if not (k in later and type(v) is type(defaults[k]) and v == defaults[k])}

    def __init__(self, preset: str | None = None, **overrides):
        params = copy.deepcopy(self.all_defaults())
        if preset is not None:
            if preset in self.preset_groups:
                raise ProtocolError(f"'{self.name}:{preset}' stands for the presets "
                                    f"{', '.join(self.preset_groups[preset])} (one column each): run it with "
                                    f"--protocol {self.name}:{preset}, or name one of them")
            if preset not in self.presets:
                raise ProtocolError(f"protocol '{self.name}' has no preset '{preset}'; presets: "
                                    f"{', '.join(self.presets) or 'none'}")
            stray = set(self.presets[preset]) - set(params)
            if stray:
                raise ProtocolError(f"protocol '{self.name}': preset '{preset}' sets {sorted(stray)}, which are not "
                                    f"parameters; parameters: {sorted(params)}")
            params.update(copy.deepcopy(self.presets[preset]))
        unknown = set(overrides) - set(params)
        if unknown:
            raise ProtocolError(f"protocol '{self.name}': unknown parameter(s) {sorted(unknown)}; "
                                f"parameters: {sorted(params)}")
        params.update(overrides)
        self.preset = preset
        self.params = params
        self.validate()

    def validate(self) -> None:
        """Every parameter's type or choice (`param_rules`), then `p` made from `params`, the shared ranges and the
        protocol's own `check`."""
        rules = param_rules(self.Params)
        for key, value in self.params.items():
            kind, allowed = rules[key]
            if kind == "choices" and not _is_choice(value, allowed):
                raise ProtocolError(f"{self.name}: {key} must be one of {allowed}, got {value!r}")
            if kind == "types" and not _type_ok(value, allowed):
                raise ProtocolError(f"{self.name}: {key} must be {_type_name(allowed)}, got {value!r}")
        self.p = p = self.Params(**self.params)
        for key, v in (("size", p.size), ("eval_size", p.eval_size)):
            if v is not None and v < 1:
                raise ProtocolError(f"{self.name}: {key} must be a positive integer, got {v!r}")
        if not p.crf_temperature > 0:
            raise ProtocolError(f"{self.name}: crf_temperature must be > 0, got {p.crf_temperature!r}")
        try:
            CRFParams.from_param(p.crf)
        except CRFError as e:
            raise ProtocolError(f"protocol '{self.name}': {e}") from None
        self.check()

    def check(self) -> None:
        """The protocol's own rules on its parameters (ranges, combinations); raise ProtocolError."""

    def optional_packages(self) -> dict[str, str]:
        """Module → the feature that imports it, for every optional package this configured protocol needs: its
        `requires`, and the CRF's package when its `crf` parameter is on. The runner imports each through
        `extras.require` while planning."""
        out = {module: f"protocol '{self.name}'" for module in self.requires}
        if CRFParams.from_param(self.params["crf"]) is not None:
            out["pydensecrf.densecrf"] = f"protocol '{self.name}' with crf=true (--crf)"
        return out

    def positive(self, *keys: str, allow_none: bool = False) -> None:
        """Each of the parameters `keys` must be > 0 (or None when `allow_none`)."""
        for key in keys:
            v = getattr(self.p, key)
            if (v is None and not allow_none) or (v is not None and not v > 0):
                raise ProtocolError(f"{self.name}: {key} must be > 0, got {v!r}")

    def fraction(self, key: str, low: float = 0.0, high: float = 1.0) -> None:
        """The parameter `key` must lie in (low, high)."""
        v = getattr(self.p, key)
        if not low < v < high:
            raise ProtocolError(f"{self.name}: {key} must be in ({low:g}, {high:g}), got {v!r}")

    def for_device(self, device: str) -> "Protocol":
        """This protocol with its machine-dependent parameters (`resolvers`) made concrete for `device`, so that the
        record's parameters, and with them its identity, name what actually ran; validated (and `p` made) again."""
        new = copy.copy(self)
        new.params = {**self.params, **{k: f(self.params[k], device) for k, f in self.resolvers.items()}}
        new.validate()
        return new

    def input_size(self, patch_size: int) -> int | None:
        """The input size this protocol fixes for a backbone of `patch_size` (None: the run's --size)."""
        return self.params["size"]

    def facets_needed(self) -> dict[str, tuple[str, ...]]:
        """The cached facets a run reads, by split role ('eval', 'train'), declared before any work so that the runner
        computes every facet the requested protocols need in one backbone pass per split and transform."""
        return {"eval": ("tokens",)}

    def backbone_facets(self) -> set[str]:
        """Every facet this protocol asks of the backbone, in the cached pass and in passes of its own (crop
        embeddings read 'cls'), so that a backbone without one is refused before any work."""
        return {f for facets in self.facets_needed().values() for f in facets}

    @classmethod
    def masks_subdir(cls, params: dict) -> str | None:
        """The folder under `--save-masks DIR/<protocol>/` this protocol's label maps go to (None: that folder)."""
        return None

    def masks_dir(self, root: Path | None) -> Path | None:
        """`--save-masks root` → the folder this protocol's label maps go under (root/<name>). The runner calls it
        while planning, before any backbone pass: the folder, and every symbolic link already inside it, must resolve
        inside root (a link out of it is refused, as for records); each file is checked again when it is written."""
        if root is None:
            return None
        folder = masks_path(root, self.name)
        if folder.is_dir():
            for parent, dirs, files in os.walk(folder):
                for link in (Path(parent) / n for n in dirs + files if (Path(parent) / n).is_symlink()):
                    masks_path(root, link)
        return folder

    def check_data(self, eval_set: SegmentationDataset, train_set: SegmentationDataset | None,
                   transform: Transform | None) -> None:
        """Refuse parameters the data cannot satisfy where sizes known before extraction tell (numbers of images,
        the transform's patch grid): the runner calls this for every job while planning, so such a run stops before
        any backbone pass, and every `run` calls it again first (for callers other than the runner; `transform` is
        None when the context has none). Default: nothing to check. Raise ProtocolError naming the parameter."""

    def train_split_wanted(self) -> list[str] | None:
        """Train splits this run reads, in order of preference ('default' = the dataset's own train split); None when
        it reads the evaluation split only. The runner opens the first available one into `ctx.train_set`."""
        return None

    def evaluate(self, ctx: Context) -> ProtocolResult:
        """The protocol's own work, called by `run`: fit what it fits, score through `Predictions` with
        `ctx.scoring`, return per-seed scores."""
        raise NotImplementedError


def backbone_tokens(ctx: Context, images: list[torch.Tensor], name_of: Callable[[int], str],
                    half: bool = False) -> torch.Tensor:
    """(B, h, w, D) float32 CPU tokens of the run's layer for normalised (3, H, W) images of one size: a second pass
    of a protocol's own (augmented crops, sliding windows), batched by `ctx.batch_size` through the one backbone pass
    (`features.embed`: bf16 autocast on CUDA; non-finite tokens stop the run, naming `name_of(j)` of the first bad
    image j). With `half` the tokens are rounded to float16 first, as the feature cache stores them (a value beyond
    float16's range is refused as the cache refuses it)."""
    n, step = len(images), ctx.batch_size
    batches = ((torch.stack(images[b: b + step]), range(b, min(b + step, n))) for b in range(0, n, step))
    return torch.cat([out["tokens"].float() for out, _ in embed(ctx.backbone(), batches, ctx.layer, ("tokens",),
                                                                 ctx.device, name_of=name_of, half=half)])


@dataclass
class Scoring:
    """A protocol run's scoring setting, given explicitly to every `Predictions` stream: the CRF parameters (None:
    plain argmax), the temperature of the CRF's unaries, the device scores are computed on, and the datasets whose
    images the CRF compares labels against. The streams tally here what the CRF did, for the record's `info.crf`, and
    the seconds spent scoring, upsampling and refining (the record's `provenance.scoring_seconds`, read by `make
    bench`)."""

    crf: CRFParams | None = None
    temperature: float = 1.0
    device: str = "cpu"
    datasets: tuple = ()
    refined: int = 0
    seconds: float = 0.0
    score_types: set = field(default_factory=set)

    def __post_init__(self):
        if self.crf is not None:
            require_crf()  # a missing package stops the run before any work (CRFError)

    def images_for(self, labels: ArrayStore, eval_size: int | None) -> Callable[[int], np.ndarray]:
        """The RGB images, at label resolution, of the split whose cached labels these are (found by the label entry's
        key: dataset id, split and content digest; drawn with the transform the labels were made with)."""
        key = labels.meta.get("key", {})
        for ds in self.datasets:
            if ds is None or key.get("dataset") != ds.id or key.get("split") != ds.split:
                continue
            if key.get("content_sha256") == ds.content_sha256() and "transform" in key:
                transform = Transform(**key["transform"])
                return functools.partial(label_image, ds, transform, eval_size=eval_size)
        raise ProtocolError("crf: cannot tell which images these labels belong to (their cache key names no dataset "
                            "of this run); pass images= to Predictions")

    def record(self, protocol: str) -> dict:
        """The record's `info.crf` block. A protocol run with the CRF on that refined nothing is refused: its record
        would name a CRF that never ran."""
        if not self.refined:
            raise ProtocolError(f"protocol '{protocol}' was run with crf=true but scored nothing through the shared "
                                "CRF path (Predictions)")
        return {**self.crf.to_dict(), "package": "pydensecrf2",
                "unaries": "softmax(scores / crf_temperature), upsampled", "crf_temperature": self.temperature,
                "score_types": sorted(self.score_types), "images_refined": self.refined,
                "seconds": round(self.seconds, 3)}


def label_image(dataset: SegmentationDataset, transform: Transform, i: int, eval_size: int | None = None) -> np.ndarray:
    """Image i as (H, W, 3) uint8 RGB at label resolution: the transform's geometry (bicubic resize, crop, black
    padding), then, with `eval_size`, a bilinear resize to eval_size × eval_size (labels are resized nearest)."""
    from PIL import Image

    x = transform.image(dataset.load_image(i), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    rgb = np.clip(np.rint(x.permute(1, 2, 0).numpy() * 255.0), 0, 255).astype(np.uint8)
    if eval_size is not None:
        rgb = np.asarray(Image.fromarray(rgb).resize((eval_size, eval_size), Image.BILINEAR))
    return rgb


def save_label_map(path: Path, labels: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> None:
    """Write an (H, W) label map as a palette PNG in the dataset's colours (pixel values = labels; `ignore_index` and
    any label beyond the palette are drawn black), atomically."""
    import io

    from PIL import Image

    if labels.min() < 0 or labels.max() > 255:
        raise ProtocolError(f"label map for {path} has values outside 0..255; cannot store as a palette PNG")
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: len(palette)] = palette[:256]
    if 0 <= ignore_index < 256:
        pal[ignore_index] = 0
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(pal.ravel().tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def masks_path(root: Path, rel: str | Path) -> Path:
    """`root / rel` for a `--save-masks` write, checked to resolve inside `root` (`paths.inside`): a folder or file
    there that is a symlink leading out of it is refused with the fix."""
    try:
        return inside(root, rel)
    except PathError as e:
        raise PathError(f"--save-masks: {e} (a symbolic link there leads out of it); remove that link or choose "
                        "another --save-masks folder") from None


def sample_name(ds, i: int) -> str:
    """The file stem a saved mask of image i gets: the sample's name as one safe path component (a name such as
    '../x' from a dataset's name column can never leave the masks folder), an index for nameless test datasets."""
    samples = getattr(ds, "samples", None)
    return safe_component(samples[i].name) if samples else f"{i:06d}"


class MaskSaver:
    """on_labels hook for `--save-masks` when clusters are matched to classes only after every image was predicted:
    the first seed's raw maps wait in a temporary folder; `finish(mapping)` writes them in class space (unmatched
    clusters = ignore) as palette PNGs named after the samples, under `ctx.save_masks[/subdir]`. The folder and
    every file it will write are checked to resolve inside `ctx.save_masks` before anything is written there."""

    def __init__(self, ctx: Context, subdir: str | None = None):
        self.dataset, self.written, self.dir = ctx.eval_set, 0, None
        if ctx.save_masks is not None:
            self.dir = masks_path(ctx.save_masks, subdir) if subdir else Path(ctx.save_masks)
            self.paths = [masks_path(self.dir, f"{sample_name(self.dataset, i)}.png")
                          for i in range(len(self.dataset))]
            self.dir.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=".raw-", dir=self.dir))

    def __call__(self, i: int, j: int, pred: np.ndarray) -> None:
        if self.dir is not None and j == 0:
            np.save(self.tmp / f"{i}.npy", pred.astype(np.int32))

    def finish(self, mapping: np.ndarray | None) -> None:
        if self.dir is None:
            return
        ds = self.dataset
        try:
            if mapping is not None:
                lut = np.where(np.asarray(mapping) < 0, ds.ignore_index, mapping)
                for f in sorted(self.tmp.glob("*.npy"), key=lambda q: int(q.stem)):
                    save_label_map(self.paths[int(f.stem)], lut[np.load(f)], ds.palette, ds.ignore_index)
                    self.written += 1
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


class LabelGrids:
    """Duck-typed token store for Predictions that scores HARD label maps: image i → an (h, w, S) float
    array holding one label grid per scoring function (seed) in its last axis; pair it with `onehot_scorer`."""

    def __init__(self, grids: list[np.ndarray]):
        self.grids = grids

    def __len__(self) -> int:
        return len(self.grids)

    def grid(self, i: int) -> tuple[int, int]:
        return tuple(self.grids[i].shape[:2])

    def image(self, i: int) -> np.ndarray:
        return self.grids[i]


def onehot_scorer(j: int, n_labels: int, confidence: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Scoring function for LabelGrids: channel j's hard labels, (B, h, w, S) → (B, n_labels, h, w) log-probabilities,
    `confidence` on the label and the rest spread evenly (the argmax is the label; the CRF, when on, sees soft
    unaries)."""
    lo = math.log((1.0 - confidence) / max(n_labels - 1, 1))
    hi = math.log(confidence)

    def score(x: torch.Tensor) -> torch.Tensor:
        lab = x[..., j].long()  # (B, h, w)
        out = torch.full((lab.shape[0], n_labels, *lab.shape[1:]), lo, device=x.device)
        out.scatter_(1, lab[:, None], hi)
        return out

    return score


def score_seeds(confs: list[np.ndarray], per_image: list, mapping_of: Callable[[int, np.ndarray], np.ndarray],
                saver: MaskSaver | None = None, extra: Callable[[int, np.ndarray, np.ndarray], dict] | None = None,
                record_mapping: bool = True) -> tuple[list[dict], np.ndarray]:
    """The scoring tail every protocol shares: for each seed j, `mapping_of(j, conf)` maps each column of its (C, K)
    confusion to a class (-1: unmatched, always wrong); the folded confusion gives the scores (with the mapping as
    `cluster_to_class` unless `record_mapping` is False, and `extra(j, conf, mapping)` adding or overriding
    protocol facts), each image's [tp, fp, fn] after matching, and, for the first seed, the saved label maps in class
    space. Returns the per-seed scores and the (S, N, C, 3) per-image statistics."""
    per_seed, stats = [], []
    for j, conf in enumerate(confs):
        mapping = np.asarray(mapping_of(j, conf), dtype=np.int64)
        sc = scores(remap(conf, mapping, conf.shape[0]))
        if record_mapping:
            sc["cluster_to_class"] = mapping.tolist()
        if extra is not None:
            sc.update(extra(j, conf, mapping))
        per_seed.append(sc)
        stats.append(image_stats(per_image[j], mapping, conf.shape[0]))
        if j == 0 and saver is not None:
            saver.finish(mapping)
    return per_seed, np.stack(stats)


def eval_labels(labels: np.ndarray, eval_size: int | None) -> np.ndarray:
    """Ground truth at the evaluation resolution: as cached (transform resolution) or nearest-resized to a square."""
    if eval_size is None:
        return labels
    return upsample_nearest(labels, (eval_size, eval_size)).astype(np.int64)


def upsample_nearest(grid: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(h, w) label or mask grid → `shape` by nearest neighbour (torch's rule, as Leopart uses), in its own dtype."""
    shape = tuple(int(v) for v in shape)
    if grid.shape == shape:
        return grid
    t = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None, None]
    return F.interpolate(t, size=shape, mode="nearest")[0, 0].numpy().astype(grid.dtype)


def scores_to_labels(scores: torch.Tensor, size: tuple[int, int], upsample: str) -> torch.Tensor:
    """(B, K, h, w) scores → (B, H, W) argmax labels: 'bilinear' upsamples the scores first, 'nearest' the argmax."""
    if upsample == "bilinear":
        return F.interpolate(scores.float(), size=size, mode="bilinear", align_corners=False).argmax(1)
    if upsample == "nearest":
        return F.interpolate(scores.argmax(1)[:, None].float(), size=size, mode="nearest")[:, 0].long()
    raise ProtocolError(f"upsample must be 'bilinear' or 'nearest', got {upsample!r}")


UPSAMPLED_SCORES = 1 << 26  # at most this many upsampled scores (floats) at once while scoring


def seeds_to_labels(scored: list[torch.Tensor], size: tuple[int, int], upsample: str) -> list[torch.Tensor]:
    """`scores_to_labels` of every scoring function's (B, K, h, w) scores of one batch of images, upsampled together:
    consecutive seeds whose scores have the same shape share one interpolation and one argmax, at most
    `UPSAMPLED_SCORES` upsampled scores at once. Interpolation and argmax work image by image and channel by channel,
    so the labels equal those of one call per seed."""
    out, j = [], 0
    while j < len(scored):
        shape = scored[j].shape
        per_seed = shape[0] * shape[1] * size[0] * size[1]
        group = max(1, UPSAMPLED_SCORES // max(per_seed, 1))
        end = j + 1
        while end < len(scored) and end - j < group and scored[end].shape == shape:
            end += 1
        labels = scores_to_labels(torch.cat(scored[j:end]), size, upsample)
        out.extend(labels.split(shape[0]))
        j = end
    return out


def _batches(tokens, labels, eval_size: int | None, budget: int) -> Iterator[list[int]]:
    """Consecutive images whose token grids and label maps have the same shapes, at most `budget` label pixels per
    batch (so B × K × H × W upsampled scores stay bounded)."""
    batch, key, pixels = [], None, 0
    for i in range(len(tokens)):
        hh, ww = (eval_size, eval_size) if eval_size else labels.grid(i)
        k = (*tokens.grid(i), hh, ww)
        if batch and (k != key or pixels + hh * ww > budget):
            yield batch
            batch, pixels = [], 0
        batch.append(i)
        key, pixels = k, pixels + hh * ww
    if batch:
        yield batch


@dataclass
class Predictions:
    """The prediction stream: every scoring function's label maps over a split. A scoring function maps (B, h, w, D)
    tokens (a torch tensor on `scoring.device`) to (B, K, h, w) scores, K ≤ `num_preds`; iterating yields (image
    indices, scoring-function index j, ground truth, labels), both (B, H, W) torch tensors at the evaluation
    resolution, in dataset order for each j. `prepare` maps tokens (numpy, (B, h, w, D)) once before all scoring
    functions see them; a NaN or infinite score stops the run (ProtocolError): an argmax over it would be a number
    without meaning.

    Without a CRF, images of equal shapes are scored, upsampled (`scores_to_labels`) and argmaxed together, with no
    Python loop over pixels and at most 2^26 upsampled scores per batch. With `scoring.crf`, each label map is the
    dense CRF of softmax(upsampled scores / temperature) against the RGB image at label resolution (`images(i)`,
    by default `scoring.images_for` the labels), one image at a time, computed in a bounded process pool
    (crf.pool_map; $SSL_SEGBENCH_CRF_WORKERS, $SSL_SEGBENCH_CRF_TIMEOUT); `score_type` names the scores in the
    record."""

    tokens: ArrayStore
    labels: ArrayStore
    score_fns: list[Callable[[torch.Tensor], torch.Tensor]]
    num_preds: int
    upsample: str
    eval_size: int | None
    scoring: Scoring
    prepare: Callable[[np.ndarray], np.ndarray] | None = None
    score_type: str = "scores"
    images: Callable[[int], np.ndarray] | None = None

    def __iter__(self) -> Iterator[tuple[list[int], int, torch.Tensor, torch.Tensor]]:
        if not isinstance(self.scoring, Scoring):
            raise ProtocolError(f"Predictions needs the run's Scoring, got {self.scoring!r}: run protocols with "
                                "Protocol.run, which sets ctx.scoring")
        return self._argmax() if self.scoring.crf is None else self._refined()

    def _scored(self, fn, x: torch.Tensor, first: int) -> torch.Tensor:
        sc = fn(x)
        if not bool(torch.isfinite(sc).all()):
            raise ProtocolError(f"scores of an image from image {first} on contain NaN or infinite values (a diverged "
                                "head or broken features); refusing to turn them into labels")
        return sc

    def _tokens(self, idx: list[int]) -> torch.Tensor:
        x = np.stack([np.asarray(self.tokens.image(i), dtype=np.float32) for i in idx])
        if self.prepare is not None:
            x = self.prepare(x)
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.scoring.device)

    def _argmax(self) -> Iterator[tuple[list[int], int, torch.Tensor, torch.Tensor]]:
        budget = max(1, UPSAMPLED_SCORES // max(self.num_preds, 1))  # label pixels per batch: ≤ 64 M upsampled scores
        for idx in _batches(self.tokens, self.labels, self.eval_size, budget):
            gt = np.stack([eval_labels(self.labels.labels(i), self.eval_size) for i in idx])
            gt = torch.from_numpy(gt).to(self.scoring.device)
            x = self._tokens(idx)
            t0 = time.perf_counter()
            scored = [self._scored(fn, x, idx[0]) for fn in self.score_fns]
            labels = seeds_to_labels(scored, tuple(gt.shape[1:]), self.upsample)
            self.scoring.seconds += time.perf_counter() - t0
            for j, lab in enumerate(labels):
                yield idx, j, gt, lab

    def _refined(self) -> Iterator[tuple[list[int], int, torch.Tensor, torch.Tensor]]:
        if self.upsample not in ("bilinear", "nearest"):
            raise ProtocolError(f"upsample must be 'bilinear' or 'nearest', got {self.upsample!r}")
        scoring = self.scoring
        images = self.images or scoring.images_for(self.labels, self.eval_size)
        pending: collections.deque = collections.deque()

        def tasks():
            for i in range(len(self.tokens)):
                gt = eval_labels(self.labels.labels(i), self.eval_size)
                img = images(i)
                if tuple(img.shape[:2]) != tuple(gt.shape):
                    raise ProtocolError(f"crf: image {i} is {img.shape[:2]} but its labels are {gt.shape}")
                x = self._tokens([i])
                for j, fn in enumerate(self.score_fns):
                    pending.append((i, j, gt))
                    sc = self._scored(fn, x, i)[0].float().cpu().numpy() / scoring.temperature
                    yield img, sc, self.upsample, scoring.crf

        t0 = time.perf_counter()
        for pred in pool_map(refine_scores, tasks()):
            i, j, gt = pending.popleft()
            yield [i], j, torch.from_numpy(np.stack([gt])), torch.from_numpy(pred[None])
        scoring.refined += len(self.tokens) * len(self.score_fns)
        scoring.seconds += time.perf_counter() - t0
        scoring.score_types.add(self.score_type)


def count_confusions(stream: Predictions, num_classes: int, ignore_index: int,
                     on_labels: Callable[[int, int, np.ndarray], None] | None = None,
                     advance: Callable[[int], None] = lambda n=1: None) -> tuple[list[np.ndarray], list[list]]:
    """What most protocols take from a stream: per scoring function, the (C, K) confusion over `num_classes` classes
    (`ignore_index` pixels skipped) and each image's own confusion (`metrics.sparse`, for `image_stats`).
    `on_labels(i, j, labels)` sees every label map (image i, scoring function j), e.g. a MaskSaver; `advance(n)`
    counts images done."""
    accs = [ConfusionAccumulator(num_classes, stream.num_preds, ignore_index, per_image=True)
            for _ in stream.score_fns]
    for idx, j, gt, pred in stream:
        accs[j].update(gt, pred)
        if on_labels is not None:
            for b, i in enumerate(idx):
                on_labels(i, j, pred[b].cpu().numpy())
        if j == len(accs) - 1:
            advance(len(idx))
    return [a.compute() for a in accs], [a.images for a in accs]



class SlidingScores:
    """Duck-typed token store for Predictions scoring the evaluation split by sliding windows
    (`eval_predictions`): image i, at the run's transform, goes window by window (batched) through the backbone
    (tokens rounded to float16, as the cache holds them), each scoring function scores every window at token
    resolution, its scores are resized to the window (`upsample`: bilinear, or nearest, which keeps the argmax of
    nearest-upsampled labels) and averaged over overlapping windows (`sliding.slide_logits`). Image i → (H, W, S·K):
    scoring function j's K channels at j·K; pair it with `channel_scorer`. `facts` counts the images and windows."""

    def __init__(self, ctx: Context, score_fns: list, channels: int, crop: int, stride: int, upsample: str,
                 labels: ArrayStore):
        self.ctx, self.score_fns, self.channels, self.upsample, self.labels = ctx, score_fns, channels, upsample, labels
        self.crop, self.stride = crop, stride
        self.facts = {"crop": crop, "stride": stride, "images": 0, "windows": 0}

    def __len__(self) -> int:
        return len(self.labels)

    def grid(self, i: int) -> tuple[int, int]:
        return self.labels.grid(i)

    def image(self, i: int) -> np.ndarray:
        ctx, ds = self.ctx, self.ctx.eval_set
        spec = ctx.backbone_ref.spec
        x = ctx.transform.image(ds.load_image(i), spec.mean, spec.std)
        if tuple(x.shape[1:]) != tuple(self.grid(i)):
            raise ProtocolError(f"sliding windows: image {i} is {tuple(x.shape[1:])} at the run's transform but its "
                                f"labels are {tuple(self.grid(i))}")
        name = f"a sliding window of image '{sample_name(ds, i)}' of {ds.id}/{ds.split}"

        def logits_of(wins: torch.Tensor) -> torch.Tensor:
            t = backbone_tokens(ctx, list(wins), lambda j: name, half=True).to(ctx.scoring.device)
            out = []
            for fn in self.score_fns:
                sc = fn(t).float()
                if sc.shape[1] != self.channels:
                    raise ProtocolError(f"sliding windows: a scoring function gave {sc.shape[1]} channels, expected "
                                        f"{self.channels}")
                bilinear = {"align_corners": False} if self.upsample == "bilinear" else {}
                out.append(F.interpolate(sc, size=tuple(wins.shape[-2:]), mode=self.upsample, **bilinear))
            return torch.cat(out, 1)

        scores = slide_logits(x, logits_of, self.crop, self.stride, ctx.batch_size)
        self.facts["images"] += 1
        self.facts["windows"] += len(windows(*x.shape[1:], (self.crop,) * 2, (self.stride,) * 2))
        return scores.permute(1, 2, 0).cpu().numpy()


def channel_scorer(j: int, channels: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Scoring function for SlidingScores: (B, H, W, S·K) → scoring function j's (B, K, H, W) scores."""
    return lambda x: x[..., j * channels: (j + 1) * channels].permute(0, 3, 1, 2)


def eval_predictions(ctx: Context, score_fns: list, num_preds: int, upsample: str, eval_size: int | None,
                     score_type: str, sliding: tuple[int, int] | None = None) -> Predictions:
    """The evaluation split's prediction stream for token scoring functions ((B, h, w, D) → (B, num_preds, h, w)),
    one path for every protocol that scores tokens: whole-image from the split's cached tokens, or, with `sliding` =
    (crop, stride), each image through sliding windows (`SlidingScores`; the cached labels alone are read, and the
    record's info.sliding says how many windows ran). Both go to label resolution (or eval_size) and argmax in the
    same `Predictions`, so `count_confusions`, the CRF and --save-masks see no difference."""
    ds = ctx.eval_set
    if sliding is None:
        fs = ctx.get(ds, ("tokens",))
        return Predictions(fs["tokens"], fs.labels, score_fns, num_preds, upsample, eval_size, ctx.scoring,
                           score_type=score_type)
    crop, stride = sliding
    if ctx.transform is None or ctx.backbone_ref is None:
        raise ProtocolError("sliding windows embed the evaluation images at the run's transform, but the run gave no "
                            "backbone or transform")
    spec = ctx.backbone_ref.spec  # the crop's own rules: `check_sliding`, run by the protocol's check and check_data
    if spec.fixed_input and crop < ctx.transform.size:
        raise ProtocolError(f"backbone '{spec.id}' takes only {spec.image_size}×{spec.image_size} input, but "
                            f"slide_crop={crop} would give it smaller windows: leave slide_crop/slide_stride unset, "
                            f"or set slide_crop >= {ctx.transform.size} (one window per image)")
    labels = ctx.get(ds, ()).labels
    store = SlidingScores(ctx, score_fns, num_preds, crop, stride, upsample, labels)
    ctx.info["sliding"] = store.facts  # filled in as the stream runs
    ctx.record_pass("sliding-window evaluation", True, split=ds.split, crop=crop, stride=stride)
    return Predictions(store, labels, [channel_scorer(j, num_preds) for j in range(len(score_fns))], num_preds,
                       upsample, eval_size, ctx.scoring, score_type=score_type)


def score_label_maps(ctx: Context, maps: list[np.ndarray], labels: ArrayStore, n_labels: list[int], upsample: str,
                     eval_size: int | None, confidence: float, saver, what: str, score_type: str
                     ) -> tuple[list[np.ndarray], list[list]]:
    """Hard label maps scored as a protocol's predictions (the pseudo-mask protocols): image i's (h, w, S) map holds
    seed j's labels (0..n_labels[j]-1) in channel j; each becomes one-hot log-probabilities with `confidence` on the
    label (so the CRF, when on, sees soft unaries) and goes through the shared stream. Returns `count_confusions`'
    per-seed confusions and per-image confusions against the evaluation split's classes."""
    ds = ctx.eval_set
    fns = [onehot_scorer(j, n, confidence) for j, n in enumerate(n_labels)]
    with progress_bar(len(maps), f"{what} on {ds.id}/{ds.split}") as advance:
        stream = Predictions(LabelGrids(maps), labels, fns, max(n_labels), upsample, eval_size, ctx.scoring,
                             score_type=score_type)
        return count_confusions(stream, ds.num_classes, ds.ignore_index, saver, advance)

# protocol name → class; each protocol module registers its class (protocols/__init__.py discovers the modules)
from ..plugins import Registry  # noqa: E402  (here with the registry it makes)

PROTOCOLS = Registry("protocol", "name", "register_protocol", ProtocolError, "ssl-segbench list protocols")
register_protocol = PROTOCOLS.register
