"""Protocol interface and the shared step from per-image scores to a dataset-level confusion matrix.

A protocol has a name, a version (bumped whenever its numbers could change) and a parameter set; named presets
reproduce published settings exactly. Everything in the parameters goes into the record, so two rows are comparable
exactly when their parameters are equal.
"""
from __future__ import annotations

import collections
import contextvars
import copy
import functools
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator

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
from ..metrics import confusion, image_stats, remap, scores, sparse
from ..paths import PathError, inside, safe_component
from ..registry import is_int, is_number
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


SHARED_DEFAULTS = {"resize": None, "size": None, "eval_size": None, "crf": False, "crf_temperature": 1.0}
# allowed types of a parameter: a tuple of types, None meaning the value may be None; float accepts int, bool is never
# an int; parameters without an entry here or in the protocol's `types` take the type of their default
_SHARED_TYPES = {"size": (int, None), "eval_size": (int, None), "crf": (bool, dict)}
_SHARED_CHOICES = {"resize": (None, *POLICIES)}


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
    info, the confusion matrices, and the (S, N, C, 3) per-image [tp, fp, fn] for bootstrap intervals over images."""

    per_seed: list[dict]
    info: dict = field(default_factory=dict)
    confusions: list | None = None
    image_stats: np.ndarray | None = None


class Protocol:
    """A named, versioned protocol. Parameters are the shared ones (`SHARED_DEFAULTS`) plus the protocol's `defaults`;
    `choices` enumerates allowed values, `types` the allowed types where the default does not show them (a default of
    None, or several types), and `check` adds the protocol's own range rules. All of it is checked when the protocol
    is made, so a bad value stops a run before any work."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    defaults: ClassVar[dict] = {}
    presets: ClassVar[dict[str, dict]] = {}
    # a name that stands for several presets, each its own column: `--protocol name:group` runs them all
    preset_groups: ClassVar[dict[str, tuple[str, ...]]] = {}
    choices: ClassVar[dict[str, tuple]] = {}
    types: ClassVar[dict[str, tuple]] = {}
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
        if "run" in cls.__dict__:  # every protocol's run gets the scoring scope (CRF) of its own parameters
            cls.run = _scoped(cls.__dict__["run"])

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
        return {**SHARED_DEFAULTS, **cls.defaults}

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

    def allowed(self, key: str) -> tuple[str, tuple]:
        """('choices' | 'types', the allowed values or types) of a parameter."""
        for kind, table in (("choices", {**_SHARED_CHOICES, **self.choices}),
                            ("types", {**_SHARED_TYPES, **self.types})):
            if key in table:
                return kind, table[key]
        default = self.all_defaults()[key]
        if default is None:
            raise TypeError(f"protocol '{self.name}': parameter '{key}' defaults to None; declare its type in `types`")
        return "types", (type(default),)

    def validate(self) -> None:
        """Every parameter's type or choice, the shared ranges, then the protocol's own `check`."""
        for key, value in self.params.items():
            kind, allowed = self.allowed(key)
            if kind == "choices" and not _is_choice(value, allowed):
                raise ProtocolError(f"{self.name}: {key} must be one of {allowed}, got {value!r}")
            if kind == "types" and not _type_ok(value, allowed):
                raise ProtocolError(f"{self.name}: {key} must be {_type_name(allowed)}, got {value!r}")
        p = self.params
        for key in ("size", "eval_size"):
            if p[key] is not None and p[key] < 1:
                raise ProtocolError(f"{self.name}: {key} must be a positive integer, got {p[key]!r}")
        if not p["crf_temperature"] > 0:
            raise ProtocolError(f"{self.name}: crf_temperature must be > 0, got {p['crf_temperature']!r}")
        try:
            CRFParams.from_param(p["crf"])
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
        """Each of `keys` must be > 0 (or None when `allow_none`)."""
        for key in keys:
            v = self.params[key]
            if (v is None and not allow_none) or (v is not None and not v > 0):
                raise ProtocolError(f"{self.name}: {key} must be > 0, got {v!r}")

    def fraction(self, key: str, low: float = 0.0, high: float = 1.0) -> None:
        """params[key] must lie in (low, high)."""
        v = self.params[key]
        if not low < v < high:
            raise ProtocolError(f"{self.name}: {key} must be in ({low:g}, {high:g}), got {v!r}")

    def for_device(self, device: str) -> "Protocol":
        """This protocol with its machine-dependent parameters (`resolvers`) made concrete for `device`, so that the
        record's parameters, and with them its identity, name what actually ran."""
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

    def run(self, ctx: Context) -> ProtocolResult:
        raise NotImplementedError


def backbone_tokens(ctx: Context, images: list[torch.Tensor], name_of: Callable[[int], str]) -> torch.Tensor:
    """(B, h, w, D) float32 CPU tokens of the run's layer for normalised (3, H, W) images of one size: a second pass
    of a protocol's own (augmented crops), batched by `ctx.batch_size` through the one backbone pass (`features.embed`:
    bf16 autocast on CUDA; non-finite tokens stop the run, naming `name_of(j)` of the first bad image j)."""
    n, step = len(images), ctx.batch_size
    batches = ((torch.stack(images[b: b + step]), range(b, min(b + step, n))) for b in range(0, n, step))
    return torch.cat([out["tokens"] for out, _ in embed(ctx.backbone(), batches, ctx.layer, ("tokens",), ctx.device,
                                                         name_of=name_of)])


@dataclass
class _Scoring:
    """What the shared scoring path needs to know about the protocol run it serves: its CRF setting, the temperature
    that turns its scores into unaries, and its context (for the images the CRF compares labels against)."""

    crf: CRFParams | None
    temperature: float
    ctx: Context
    refined: int = 0
    seconds: float = 0.0
    score_types: set = field(default_factory=set)

    def images_for(self, labels: ArrayStore, eval_size: int | None) -> Callable[[int], np.ndarray]:
        """The RGB images, at label resolution, of the split whose cached labels these are (found by the label entry's
        key: dataset id, split and content digest; drawn with the transform the labels were made with)."""
        key = labels.meta.get("key", {})
        for ds in (self.ctx.eval_set, self.ctx.train_set):
            if ds is None or key.get("dataset") != ds.id or key.get("split") != ds.split:
                continue
            if key.get("content_sha256") == ds.content_sha256() and "transform" in key:
                transform = Transform(**key["transform"])
                return functools.partial(label_image, ds, transform, eval_size=eval_size)
        raise ProtocolError("crf: cannot tell which images these labels belong to (their cache key names no dataset "
                            "of this run); pass images= to accumulate_confusion")


_SCORING: contextvars.ContextVar[_Scoring | None] = contextvars.ContextVar("ssl_segbench_scoring", default=None)


def _scoped(run):
    """Wrap Protocol.run: the protocol's `crf` parameter reaches accumulate_confusion through a context variable, so
    every protocol that scores through it supports CRF without passing it along; the resolved CRF parameters go into
    the result's info."""

    @functools.wraps(run)
    def wrapper(self, ctx: Context) -> ProtocolResult:
        crf = CRFParams.from_param(self.params.get("crf"))  # validated when the protocol was made
        if crf is not None:
            try:
                require_crf()
            except CRFError as e:
                raise ProtocolError(f"protocol '{self.name}' with crf=true: {e}") from None
        self.check_data(ctx.eval_set, ctx.train_set, ctx.transform)
        scope = _Scoring(crf, float(self.params["crf_temperature"]), ctx)
        token = _SCORING.set(scope)
        try:
            result = run(self, ctx)
        finally:
            _SCORING.reset(token)
        if crf is not None:
            if not scope.refined:
                raise ProtocolError(f"protocol '{self.name}' was run with crf=true but scored nothing through the "
                                    "shared CRF path (accumulate_confusion)")
            result.info["crf"] = {**crf.to_dict(), "package": "pydensecrf2",
                                                    "unaries": "softmax(scores / crf_temperature), upsampled",
                                                    "crf_temperature": scope.temperature,
                                                    "score_types": sorted(scope.score_types),
                                                    "images_refined": scope.refined,
                                                    "seconds": round(scope.seconds, 3)}
        return result

    return wrapper


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
    """Duck-typed token store for accumulate_confusion that scores HARD label maps: image i → an (h, w, S) float
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


def _confusions_batch(gt: torch.Tensor, pred: torch.Tensor, num_classes: int, num_preds: int,
                      ignore_index: int) -> np.ndarray:
    """(B, H, W) labels → (B, C, K) int64 confusions, one bincount for the batch (ignore pixels go to a spare bin)."""
    b = gt.shape[0]
    keep = gt != ignore_index
    if bool((keep & ((gt < 0) | (gt >= num_classes))).any()):
        raise ValueError(f"ground-truth labels outside 0..{num_classes - 1} (ignore {ignore_index})")
    if bool(((pred < 0) | (pred >= num_preds)).any()):
        raise ValueError(f"predicted labels outside 0..{num_preds - 1}")
    cells = b * num_classes * num_preds
    flat = (torch.arange(b, device=gt.device)[:, None, None] * num_classes + gt) * num_preds + pred
    counts = torch.bincount(torch.where(keep, flat, cells).reshape(-1), minlength=cells + 1)[:cells]
    return counts.reshape(b, num_classes, num_preds).cpu().numpy().astype(np.int64)


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


def accumulate_confusion(tokens: ArrayStore, labels: ArrayStore, score_fns: list[Callable[[torch.Tensor],
                                                                                          torch.Tensor]],
                         num_classes: int, num_preds: int, ignore_index: int, upsample: str,
                         eval_size: int | None, advance=lambda n=1: None,
                         prepare: Callable[[np.ndarray], np.ndarray] | None = None, *,
                         crf: CRFParams | bool | dict | None = None,
                         images: Callable[[int], np.ndarray] | None = None,
                         on_labels: Callable[[int, int, np.ndarray], None] | None = None,
                         per_image: list | None = None, score_type: str = "scores",
                         temperature: float | None = None, device: str | None = None) -> list[np.ndarray]:
    """For each scoring function (one per seed): dataset-level (C, K) confusion of its upsampled argmax predictions.
    A scoring function maps (B, h, w, D) tokens (a torch tensor) to (B, K, h, w) scores; images of equal shapes are
    scored, upsampled, argmaxed and counted in batches on `device` (default: the running protocol's; the GPU when
    the run has one), with no Python loop over pixels. `prepare` maps tokens (numpy, (B, h, w, D)) once before all
    scoring functions see them. A score that is NaN or infinite stops the run (ProtocolError): an argmax over it
    would be a number without meaning.

    CRF: `crf=None` takes the running protocol's `crf` parameter, False turns it off, True / CRFParams / a dict turn
    it on. Then each prediction is the dense CRF of softmax(upsampled scores / temperature) (`temperature=None`: the
    protocol's `crf_temperature`; `score_type` names what the scores are, for the record) against the RGB image at
    label resolution (`images(i)`, by default read from the split the labels belong to), computed in a bounded process
    pool (crf.pool_map; $SSL_SEGBENCH_CRF_WORKERS, $SSL_SEGBENCH_CRF_TIMEOUT). `on_labels(i, j, labels)` sees every
    final label map (image i, scoring function j), e.g. to save it. A `per_image` list receives, per scoring function,
    each image's confusion in `metrics.sparse` form (for bootstrap intervals over images)."""
    scope = _SCORING.get()
    if crf is None:
        params = scope.crf if scope is not None else None
    else:
        params = crf if isinstance(crf, CRFParams) else CRFParams.from_param(crf)
    if temperature is None:
        temperature = scope.temperature if scope is not None else 1.0
    if device is None:
        device = str(scope.ctx.device) if scope is not None else "cpu"

    def scored(fn, x: torch.Tensor, first: int) -> torch.Tensor:
        sc = fn(x)
        if not bool(torch.isfinite(sc).all()):
            raise ProtocolError(f"scores of an image from image {first} on contain NaN or infinite values (a diverged "
                                "head or broken features); refusing to turn them into labels")
        return sc

    def tokens_of(idx: list[int]) -> torch.Tensor:
        x = np.stack([np.asarray(tokens.image(i), dtype=np.float32) for i in idx])
        if prepare is not None:
            x = prepare(x)
        return torch.from_numpy(np.ascontiguousarray(x)).to(device)

    confs = [np.zeros((num_classes, num_preds), dtype=np.int64) for _ in score_fns]
    if per_image is not None:
        per_image[:] = [[] for _ in score_fns]

    def add(j: int, conf: np.ndarray) -> None:
        confs[j] += conf
        if per_image is not None:
            per_image[j].append(sparse(conf))

    if params is None:
        budget = max(1, (1 << 26) // max(num_preds, 1))  # label pixels per batch: ≤ 64 M upsampled scores
        for idx in _batches(tokens, labels, eval_size, budget):
            gt = torch.from_numpy(np.stack([eval_labels(labels.labels(i), eval_size) for i in idx])).to(device)
            x = tokens_of(idx)
            for j, fn in enumerate(score_fns):
                pred = scores_to_labels(scored(fn, x, idx[0]), tuple(gt.shape[1:]), upsample)
                for conf in _confusions_batch(gt, pred, num_classes, num_preds, ignore_index):
                    add(j, conf)
                if on_labels is not None:
                    for b, i in enumerate(idx):
                        on_labels(i, j, pred[b].cpu().numpy())
            advance(len(idx))
        return confs

    if upsample not in ("bilinear", "nearest"):
        raise ProtocolError(f"upsample must be 'bilinear' or 'nearest', got {upsample!r}")
    try:
        require_crf()
    except CRFError as e:
        raise ProtocolError(str(e)) from None
    if images is None:
        if scope is None:
            raise ProtocolError("crf outside a protocol run needs images= (RGB at label resolution)")
        images = scope.images_for(labels, eval_size)
    pending: collections.deque = collections.deque()

    def tasks():
        for i in range(len(tokens)):
            gt = eval_labels(labels.labels(i), eval_size)
            img = images(i)
            if tuple(img.shape[:2]) != tuple(gt.shape):
                raise ProtocolError(f"crf: image {i} is {img.shape[:2]} but its labels are {gt.shape}")
            x = tokens_of([i])
            for j, fn in enumerate(score_fns):
                pending.append((i, j, gt))
                yield img, scored(fn, x, i)[0].float().cpu().numpy() / temperature, upsample, params

    t0 = time.perf_counter()
    for pred in pool_map(refine_scores, tasks()):
        i, j, gt = pending.popleft()
        add(j, confusion(gt, pred, num_classes, num_preds, ignore_index))
        if on_labels is not None:
            on_labels(i, j, pred)
        if j == len(score_fns) - 1:
            advance()
    if scope is not None:
        scope.refined += len(tokens) * len(score_fns)
        scope.seconds += time.perf_counter() - t0
        scope.score_types.add(score_type)
    return confs


# protocol name → class; each protocol module registers its class (protocols/__init__.py discovers the modules)
from ..plugins import Registry  # noqa: E402  (here with the registry it makes)

PROTOCOLS = Registry("protocol", "name", "register_protocol", ProtocolError, "ssl-segbench list protocols")
register_protocol = PROTOCOLS.register
