"""One benchmark run: backbone × dataset × protocols → records. The only place the pipeline's stages meet.

The whole run is checked before any work starts: every protocol spec, preset and `--param` is resolved and validated
(a parameter for a protocol that is not in the run, an unknown key or a bad value is an error listing what is
allowed), then the dataset is opened, then the backbone is resolved. Then the run is planned: each protocol declares
the facets it reads per split (`Protocol.facets_needed`), and every missing facet of a (split, transform) is computed
in one backbone pass before the first protocol runs, so a suite of protocols costs one pass, not one per protocol.
Each record lists the passes behind it, with what this invocation computed.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__, distributed
from .atomic import write_json_atomic
from .backbones import BackboneRef, looks_like_path, normalisation_problem, registry_match
from .backbones.checkpoint import options_problem as checkpoint_options_problem
from .data import HF_PREFIX, DatasetError, SegmentationDataset, get_dataset
from .distributed import SINGLE, World
from .errors import SegbenchError
from .extras import require
from .faiss_blas import blas_config
from .features import FeatureSet, compute_precision, extract, loader_workers
from .metrics import bootstrap_ci
from .paths import results_dir as default_results_dir
from .progress import console
from .protocols import PROTOCOLS, Context, Protocol, ProtocolError, get_protocol, protocol_class
from .records import SCHEMA, Record, check_finite, encode_array, environment, summarize
from .registry import is_int, load_registry
from .setting import Setting
from .transforms import POLICIES, Transform, TransformError

OVERWRITE = ("skip", "always")


@dataclass
class RunOptions:
    backbone: str  # or an in-memory model object (`ssl_segbench.evaluate`)
    dataset: str
    protocols: tuple[str, ...] = ("kmeans", "linear")
    data_root: str | None = None
    split: str | None = None
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    seeds: int | list[int] | None = None  # a count n (seeds 0..n-1) or distinct seeds; None: the protocol's default
    layer: int = -1
    resize: str = "shorter"
    size: int = 224
    results_dir: Path | None = None
    overwrite: str = "skip"
    registry: str | None = None
    params: dict | None = None  # {protocol name: {param: value}}
    dataset_options: dict | None = None  # loader options (skip_bad, curated_list, ...), for every split alike
    save_masks: Path | None = None  # label maps (first seed, class space) as PNGs under <save_masks>/<protocol>/
    write_records: bool = True  # False: compute and return records without storing them (e.g. for `show`)
    plan_only: bool = False  # True: resolve every record's path and return ('pending', path, None) for the missing
    mean: tuple[float, ...] | None = None  # input normalisation stated by the user (with std), replacing the backbone's
    std: tuple[float, ...] | None = None
    arch: str | None = None  # timm architecture of a training checkpoint file (--backbone run/checkpoint.pth)
    checkpoint_key: str | None = None  # its key set to read (teacher, student, ...); None: the default choice

    def argv(self) -> list[str]:
        """The `ssl-segbench run` arguments that parse back to these options (`cli.run_options`, tested both ways): how
        a sweep cell, which carries its RunOptions, starts its job, and what its log shows. Values go as
        `--flag=value` (a negative value stays a value) and parameters and dataset options as JSON, which `--param`
        and `-o` read back as the same values."""
        argv = ["--backbone", self.backbone, "--dataset", self.dataset, "--protocol", ",".join(self.protocols)]
        for flag, value in (("--data-root", self.data_root), ("--split", self.split), ("--device", self.device),
                            ("--batch-size", self.batch_size), ("--workers", self.workers), ("--layer", self.layer),
                            ("--resize", self.resize), ("--size", self.size), ("--registry", self.registry),
                            ("--results-dir", self.results_dir), ("--overwrite", self.overwrite),
                            ("--save-masks", self.save_masks), ("--arch", self.arch),
                            ("--checkpoint-key", self.checkpoint_key)):
            if value is not None:
                argv.append(f"{flag}={value}")
        if self.seeds is not None:  # a trailing comma keeps a one-seed list a list: '3,' is seed 3, '3' three seeds
            seeds = self.seeds
            argv.append("--seeds=" + (str(seeds) if isinstance(seeds, int) else
                                      ",".join(map(str, seeds)) + ("," if len(seeds) == 1 else "")))
        for flag, channels in (("--mean", self.mean), ("--std", self.std)):
            if channels is not None:
                argv.append(f"{flag}=" + ",".join(repr(float(c)) for c in channels))
        for proto, values in (self.params or {}).items():
            for key, value in values.items():
                argv += ["--param", f"{proto}.{key}={json.dumps(value)}"]
        for key, value in (self.dataset_options or {}).items():
            argv += ["-o", f"{key}={json.dumps(value)}"]
        return argv

    def normalisation(self):
        """(mean, std) stated by the user, or None (the backbone's own: registry entry or checkpoint files)."""
        return None if self.mean is None and self.std is None else (tuple(self.mean), tuple(self.std))


class RunOptionsError(SegbenchError):
    """Run options that cannot give a valid record; the message names each option and its valid values."""


DEVICES = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str) -> str:
    """'auto' → cuda when there is a GPU, else cpu; any other (checked) device as it is."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _device_problem(device, here: bool) -> str | None:
    """Why `device` cannot run the benchmark (None: it can). `here`: judge it against this machine's GPUs too."""
    m = re.fullmatch(r"cuda(?::(\d+))?", device) if isinstance(device, str) else None
    if device not in ("auto", "cpu") and m is None:
        return f"--device {device!r} is not supported: use {DEVICES} (N below the number of GPUs)"
    if m is None or not here:
        return None
    if not torch.cuda.is_available():
        return (f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}): use "
                "--device cpu, or auto")
    n = torch.cuda.device_count()
    if m.group(1) is not None and int(m.group(1)) >= n:
        return f"--device {device}: this machine has {n} GPU(s): use cuda, or cuda:0 to cuda:{n - 1}"
    return None


def resolve_seeds(seeds: int | list[int] | None) -> list[int] | None:
    """A seed count n → [0, ..., n-1]; a list as it is (both checked by `option_problems` first)."""
    return list(range(seeds)) if is_int(seeds) else None if seeds is None else list(seeds)


def _seeds_problem(seeds) -> str | None:
    """Seeds must be independent: a count of at least 1, or distinct non-negative integers."""
    if seeds is None:
        return None
    fix = "give a count (--seeds 5: seeds 0 to 4) or a comma list of distinct non-negative integers (--seeds 0,1,2)"
    if is_int(seeds):
        return None if seeds >= 1 else f"--seeds {seeds}: a seed count must be at least 1; {fix}"
    if not isinstance(seeds, (list, tuple)) or not all(is_int(s) for s in seeds):
        return f"--seeds {seeds!r}: not a seed count or a list of integers; {fix}"
    text = ",".join(map(str, seeds))
    if not seeds:
        return f"--seeds: no seed given; {fix}"
    if min(seeds) < 0:
        return f"--seeds {text}: seed {min(seeds)} is negative; {fix}"
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        return (f"--seeds {text}: seed(s) {', '.join(map(str, twice))} listed more than once, so the runs would not "
                f"be independent and their spread would read too small; {fix}, e.g. --seeds {len(seeds)} "
                f"(= {','.join(map(str, range(len(seeds))))})")
    return None


def option_problems(opts: RunOptions, here: bool = True) -> list[tuple[str, str]]:
    """(option, message) for every run option whose value cannot give a valid record, found from the values alone
    (nothing is read or computed); `here`: the run happens on this machine, so its device must exist here."""
    found = [("seeds", _seeds_problem(opts.seeds)), ("device", _device_problem(opts.device, here))]
    if not is_int(opts.size) or opts.size <= 0:
        found.append(("size", f"--size {opts.size!r}: the input size must be a positive multiple of the backbone's "
                              "patch size, e.g. 224 (the default) or 448"))
    if opts.batch_size is not None and (not is_int(opts.batch_size) or opts.batch_size <= 0):
        found.append(("batch_size", f"--batch-size {opts.batch_size!r}: images per backbone call must be at least "
                                    "1; leave it out for the default (64 on GPU, 16 on CPU)"))
    if (opts.mean is None) != (opts.std is None):
        found.append(("mean" if opts.mean is None else "std", "--mean and --std are given together (each R,G,B, e.g. "
                      "--mean 0.5,0.5,0.5 --std 0.5,0.5,0.5) or not at all (the backbone's own normalisation)"))
    elif opts.mean is not None and (why := normalisation_problem(opts.mean, opts.std)):
        found.append(("std" if why.startswith("std") else "mean",
                      f"--mean/--std: {why}; give 3 finite numbers each, std above 0, e.g. --mean 0.5,0.5,0.5 "
                      "--std 0.5,0.5,0.5"))
    found.append(("arch", checkpoint_options_problem(opts.backbone, opts.arch, opts.checkpoint_key)))
    if opts.workers is not None and (not is_int(opts.workers) or opts.workers < 0):
        found.append(("workers", f"--workers {opts.workers!r}: DataLoader workers must be 0 (decode in the main "
                                 "process) or more; leave it out for the default"))
    if not is_int(opts.layer):
        found.append(("layer", f"--layer {opts.layer!r}: the block to read is an integer (-1 = the last block)"))
    if opts.resize not in POLICIES:
        found.append(("resize", f"--resize {opts.resize!r}: use one of {', '.join(POLICIES)}"))
    if opts.overwrite not in OVERWRITE:
        found.append(("overwrite", f"--overwrite {opts.overwrite!r}: use one of {', '.join(OVERWRITE)}"))
    return [(key, message) for key, message in found if message]


def check_options(opts: RunOptions, here: bool = True) -> None:
    """Refuse, before any work, run options that cannot give a valid record, listing every one with its fix."""
    problems = option_problems(opts, here)
    if problems:
        raise RunOptionsError("; ".join(message for _, message in problems))


def check_layer(layer: int, spec) -> None:
    """Refuse, before any work, a block index outside the backbone's depth (registry `num_layers`, or the ad-hoc
    checkpoint's config); a depth not known before loading is checked by the backbone itself."""
    depth = spec.num_layers
    if depth is None or -max(depth, 1) <= layer < depth:
        return
    valid = "-1 (its only output)" if depth == 0 else f"-{depth} to {depth - 1} (-1 = the last block, final norm)"
    raise RunOptionsError(f"--layer {layer} is out of range for backbone '{spec.id}' with {depth} transformer "
                          f"blocks: use {valid}")


def plan_protocols(specs: tuple[str, ...], params: dict | None) -> list[Protocol]:
    """Every protocol of the run, configured and validated, before any work: `params` may only name protocols of the
    run, and each protocol checks its keys and values."""
    params = params or {}
    names = list(dict.fromkeys(spec.partition(":")[0] for spec in specs))
    if not specs:
        raise ProtocolError(f"no protocol given; known: {', '.join(sorted(PROTOCOLS))}")
    for name in names:
        protocol_class(name)  # a mistyped name is an error suggesting the close ones
    specs = tuple(member for spec in specs for member in _expand_group(spec))
    for name in params:
        if name not in names:
            known = "" if name in PROTOCOLS else f" and is not a protocol (known: {', '.join(sorted(PROTOCOLS))})"
            raise ProtocolError(f"--param {name}.{next(iter(params[name]), 'KEY')}=...: '{name}' is not among this "
                                f"run's protocols ({', '.join(names)}){known}; write --param PROTOCOL.KEY=VALUE with "
                                "one of them")
    protocols = [get_protocol(spec, **params.get(spec.partition(":")[0], {})) for spec in dict.fromkeys(specs)]
    for proto in protocols:  # their optional packages (extras), before any backbone pass
        for module, feature in proto.optional_packages().items():
            require(module, feature)
    return protocols


CLS_FACETS = {"cls", "attn", "attn_logits"}


def check_backbone_fits(proto: Protocol, spec, transform: Transform, given: tuple[str, ...] | None = None) -> None:
    """Refuse, before any work, a protocol that needs what the backbone cannot give: a facet outside `given` (an
    in-memory Adapter's facets; None: every facet), the CLS token or its attention on a backbone without one, or an
    input size the backbone cannot take."""
    lacking = sorted(proto.backbone_facets() - set(given)) if given is not None else []
    if lacking:
        usable = sorted(n for n, cls in PROTOCOLS.items() if cls().backbone_facets() <= set(given))
        raise ProtocolError(f"protocol '{proto.name}' needs {', '.join(lacking)} of the backbone, but the Adapter of "
                            f"'{spec.id}' gives only {', '.join(given)}: pass {', '.join(f + '=' for f in lacking)} "
                            f"to ssl_segbench.Adapter, or use a protocol it can serve: {', '.join(usable)}")
    missing = sorted(proto.backbone_facets() & CLS_FACETS) if spec.num_prefix_tokens == 0 else []
    if missing:
        usable = sorted(n for n, cls in PROTOCOLS.items() if not cls().backbone_facets() & CLS_FACETS)
        raise ProtocolError(f"protocol '{proto.name}' needs {', '.join(missing)} of the backbone, but '{spec.id}' has "
                            f"no CLS token ({spec.method}: num_prefix_tokens 0). Protocols that read patch tokens "
                            f"only work with it: {', '.join(usable)}")
    if spec.fixed_input and (transform.policy != "square" or transform.size != spec.image_size):
        raise ProtocolError(f"backbone '{spec.id}' takes only {spec.image_size}×{spec.image_size} input (its "
                            f"position terms are fixed to that grid), but '{proto.name}' would give it "
                            f"{transform.policy} {transform.size}: use --resize square --size {spec.image_size}")


def check_gpu_memory(spec, device: str) -> None:
    """Refuse, before any work, a backbone whose registry entry states more GPU memory than the run's GPU has."""
    if spec.min_gpu_memory is None or not device.startswith("cuda"):
        return
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30
    if total < spec.min_gpu_memory:
        raise SegbenchError(f"backbone '{spec.id}' needs a GPU with at least {spec.min_gpu_memory} GiB "
                            f"(backbones.yaml: min_gpu_memory), but {device} has {total:.0f} GiB: use a larger GPU")


def resolve_params(proto: Protocol, patch_size: int, size: int, resize: str,
                   device: str | None = None) -> tuple[Protocol, dict, Transform]:
    """The protocol as a run resolves it, and the only place that does: its machine-dependent parameters made concrete
    for `device` (None: left as given, for checks before the device is known), its resize policy and input size
    filled in from the run's (`size`, `resize`) unless it fixes them for a backbone of `patch_size`; with the
    transform they give. Runs, their checks and published claims (`published.Claim`) all resolve through it."""
    if device is not None:
        proto = proto.for_device(device)
    params = dict(proto.params)
    params["resize"] = params["resize"] or resize
    params["size"] = proto.input_size(patch_size) or size
    return proto, params, Transform(params["resize"], params["size"], patch_size)


def plan_setting(ref: BackboneRef, eval_set: SegmentationDataset, train_set: SegmentationDataset | None,
                 proto: Protocol, params: dict, layer: int, seeds: list[int]) -> Setting:
    """The Setting of one protocol's record, built here alone (every reader takes it from the record); parameters
    added after records existed are left out while at their default (`Protocol.identity_params`)."""
    return Setting(
        backbone=ref.spec.id, source=ref.source, revision=ref.revision, dataset=eval_set.id, split=eval_set.split,
        data_digest=eval_set.content_sha256(), protocol=proto.name, version=proto.version,
        params=proto.identity_params(params), layer=layer,
        seeds=tuple(seeds),
        # registry entries' keys stay as they were before this field
        normalisation=None if ref.normalisation_source == "registry" else {"mean": list(ref.spec.mean),
                                                                          "std": list(ref.spec.std)},
        train=None if proto.train_split_wanted() is None else {
            "split": train_set.split if train_set else None,
            "content_sha256": train_set.content_sha256() if train_set else None},
        preset=proto.preset, decoding={k: v for k, v in eval_set.decoding_identity().items() if v},
        train_images=len(train_set) if train_set is not None else None)


def _spec_without_hub(name: str, registry: str | None, normalisation=None, arch=None, checkpoint_key=None):
    """The backbone's spec as far as it is known without the Hub: the registry entry (named by its id or its Hub
    repo), or a local checkpoint directory's; None for a Hub repo id not in the registry (its job resolves it). An
    unknown id, a missing directory or a checkpoint without normalisation is the error `BackboneRef` gives."""
    specs = load_registry(registry)
    spec = specs.get(name) or registry_match(name, specs)
    if spec is not None:
        return spec
    if "/" in name and not looks_like_path(name) and not Path(name).expanduser().exists():
        return None
    return BackboneRef(name, registry, normalisation, arch, checkpoint_key).spec


def preflight(opts: RunOptions, here: bool = True) -> list[tuple[str, str]]:
    """(option, message) for every problem `run(opts)` refuses before its work, all of them, found without the Hub:
    the options' values, the protocols and their parameters, the dataset (id, root, split, options), the backbone
    (a known id or a directory that exists), the layer and input size for its depth and patch. `here`: the run
    happens on this machine (else its device is not judged by this one's GPUs). For checking a grid as a whole."""
    found = option_problems(opts, here)

    def attempt(key: str, check):
        try:
            return check()
        except SegbenchError as e:
            found.append((key, str(e).splitlines()[0]))

    protocols = attempt("protocols", lambda: plan_protocols(opts.protocols, None))
    if protocols and opts.params:  # the protocols are known: now their parameters
        protocols = attempt("params", lambda: plan_protocols(opts.protocols, opts.params))
    if not (opts.dataset.startswith(HF_PREFIX) and opts.data_root is None):  # a Hub dataset: opened by its job
        attempt("dataset", lambda: get_dataset(opts.dataset, opts.data_root, opts.split,
                                               **(opts.dataset_options or {})))
    spec = attempt("backbone", lambda: _spec_without_hub(opts.backbone, opts.registry,
                                                                     opts.normalisation(), opts.arch,
                                                                     opts.checkpoint_key))
    if spec is not None and not {key for key, _ in found} & {"layer", "size", "resize"}:
        attempt("layer", lambda: check_layer(opts.layer, spec))
        for proto in protocols or []:  # the input size against the patch, and what the protocol needs of the backbone
            try:
                check_backbone_fits(proto, spec, resolve_params(proto, spec.patch_size, opts.size, opts.resize)[2])
            except SegbenchError as e:
                found.append(("size" if isinstance(e, TransformError) else "protocols", str(e).splitlines()[0]))
    return list(dict.fromkeys(found))


def _expand_group(spec: str) -> list[str]:
    """'name:group' → its member presets, one protocol (and one column) each; any other spec → itself."""
    name, _, preset = spec.partition(":")
    group = PROTOCOLS[name].preset_groups.get(preset)
    return [f"{name}:{member}" for member in group] if group else [spec]


class _Splits:
    """The run's datasets by split name, each opened once with the run's loader options."""

    def __init__(self, opts: RunOptions, eval_set: SegmentationDataset):
        self.opts, self.eval_set = opts, eval_set
        self.opened: dict[str, SegmentationDataset] = {eval_set.split: eval_set}

    def train_for(self, proto: Protocol) -> tuple[SegmentationDataset | None, str | None]:
        """(the train split the protocol asked for, or None to use the evaluation images; a note on the choice)."""
        wanted = proto.train_split_wanted()
        if wanted is None:
            return None, None
        ev = self.eval_set
        available = ev.available_splits()
        for n, cand in enumerate(wanted):
            name = ev.train_split if cand == "default" else cand
            if name is None or name == ev.split or name not in available:
                continue
            if name not in self.opened:
                self.opened[name] = get_dataset(self.opts.dataset, self.opts.data_root, name,
                                                **(self.opts.dataset_options or {}))
            note = None if n == 0 else f"first available of {wanted} under this root"
            return self.opened[name], note
        if len(wanted) == 1 and wanted[0] != "default":
            raise DatasetError(f"{proto.name}: train_split '{wanted[0]}' is not available for '{ev.id}' under "
                               f"{ev.root} (available: {', '.join(available) or 'none'}, evaluation split "
                               f"'{ev.split}')")
        return None, ("no train split under this root" if wanted == ["default"]
                      else f"none of {wanted} under this root")


@dataclass
class _Job:
    """One protocol of the run, resolved: what it reads, under which identity, and where its record goes."""

    proto: Protocol
    params: dict
    transform: Transform
    seeds: list[int]
    train_set: SegmentationDataset | None
    train_note: str | None
    setting: Setting
    path: Path
    masks: Path | None  # where `--save-masks` puts its label maps, checked while planning


class _FeaturePlan:
    """Every facet the run's protocols need, grouped by (split, transform), computed in one backbone pass per group
    before any protocol runs; a protocol's `ctx.get` then reads the cache and reports what the shared pass computed.
    A facet nobody declared is still extracted on demand (its own pass, reported as such)."""

    def __init__(self, extract_fn, world: World = SINGLE):
        self.extract, self.world = extract_fn, world
        self.groups: dict[tuple, tuple[SegmentationDataset, Transform, set]] = {}
        self.computed: dict[tuple, set] = {}
        self.seconds = 0.0

    def need(self, ds: SegmentationDataset, transform: Transform, facets) -> None:
        self.groups.setdefault((id(ds), transform), (ds, transform, set()))[2].update(facets)

    def run(self) -> None:
        t0 = time.perf_counter()
        for key, (ds, transform, facets) in self.groups.items():  # every rank, each its shard of the images
            self.computed[key] = set(self.extract(ds, transform, tuple(sorted(facets)), self.world).computed)
        self.seconds = round(time.perf_counter() - t0, 3)

    def features(self, ds: SegmentationDataset, facets, transform: Transform) -> FeatureSet:
        fs = self.extract(ds, transform, tuple(facets), SINGLE)  # protocols run on rank 0 alone
        shared = self.computed.get((id(ds), transform), set()) & (set(facets) | {"labels"})
        return dataclasses.replace(fs, computed=tuple(sorted(set(fs.computed) | shared)))


def run(opts: RunOptions, on_record=lambda status, path, record: None) \
        -> list[tuple[str, Path, Record | Setting | None]]:
    """Run every protocol; returns (status, path, record) with status 'written', 'skipped' (record exists) or
    'computed' (write_records=False); with `plan_only`, ('pending', path, its Setting) for each missing record."""
    check_options(opts)
    protocols = plan_protocols(opts.protocols, opts.params)
    world, device = (SINGLE, resolve_device(opts.device)) if opts.plan_only else \
        distributed.setup(resolve_device(opts.device))
    options = opts.dataset_options or {}
    eval_set = get_dataset(opts.dataset, opts.data_root, opts.split, **options)
    ref = BackboneRef(opts.backbone, opts.registry, opts.normalisation(), opts.arch, opts.checkpoint_key)
    if ref.note:
        console.print(ref.note, highlight=False)
    check_layer(opts.layer, ref.spec)
    check_gpu_memory(ref.spec, device)
    splits = _Splits(opts, eval_set)
    batch_size = opts.batch_size if opts.batch_size is not None else 64 if device.startswith("cuda") else 16
    workers = opts.workers if opts.workers is not None else loader_workers(device)
    results = Path(opts.results_dir or default_results_dir())
    out, jobs = [], []
    for proto in protocols:
        proto, params, transform = resolve_params(proto, ref.spec.patch_size, opts.size, opts.resize, device)
        check_backbone_fits(proto, ref.spec, transform, ref.facets)
        seeds = resolve_seeds(opts.seeds) or list(range(proto.default_seeds))
        train_set, train_note = splits.train_for(proto)
        setting = plan_setting(ref, eval_set, train_set, proto, params, opts.layer, seeds)
        path = setting.path(results)
        if opts.write_records and path.exists() and opts.overwrite == "skip":
            out.append(("skipped", path, None))
            on_record("skipped", path, None)
            continue
        proto.check_data(eval_set, train_set, transform)  # sizes the data cannot satisfy: before any extraction
        jobs.append(_Job(proto, params, transform, seeds, train_set, train_note, setting, path,
                         proto.masks_dir(opts.save_masks)))
    if opts.plan_only:
        return out + [("pending", job.path, job.setting) for job in jobs]

    plan = _FeaturePlan(lambda ds, transform, facets, w: extract(ref, ds, transform, opts.layer, facets, device,
                                                                 batch_size, workers, world=w), world)
    for job in jobs:
        for role, facets in job.proto.facets_needed().items():
            ds = eval_set if role == "eval" else job.train_set
            if ds is not None:
                plan.need(ds, job.transform, facets)
    plan.run()
    if not world.main:  # the other ranks helped extract; rank 0 runs the protocols and writes the records
        return []

    for job in jobs:
        record = _run_job(job, plan, opts, ref, eval_set, device, batch_size)
        status = "written" if opts.write_records else "computed"
        if opts.write_records:
            write_json_atomic(job.path, record.to_json())
        out.append((status, job.path, record))
        on_record(status, job.path, record)
    return out


def _run_job(job: _Job, plan: _FeaturePlan, opts: RunOptions, ref: BackboneRef, eval_set, device: str,
             batch_size: int) -> Record:
    proto, transform, train_set = job.proto, job.transform, job.train_set
    ctx = Context(eval_set=eval_set, train_set=train_set, seeds=job.seeds, device=device, backbone_ref=ref,
                  features=lambda ds, facets: plan.features(ds, facets, transform), transform=transform,
                  batch_size=batch_size, layer=opts.layer, train_note=job.train_note,
                  save_masks=job.masks)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.perf_counter()
    result = proto.run(ctx)
    metrics = summarize(result.per_seed)
    stats = result.image_stats
    if stats is not None:  # 95% interval of the seed mean, resampling images
        for m, ci in bootstrap_ci(stats).items():
            metrics[m]["ci95"] = ci
    check_finite(metrics, f"{proto.name} on {eval_set.id}/{eval_set.split} with {ref.spec.id}")
    resized = sorted(ctx.resized_masks.get(eval_set.split, ()))
    info = {**result.info, **ctx.info}
    if train_set is not None:
        info["train_images"] = len(train_set)
    if train_set is not None and ctx.resized_masks.get(train_set.split):
        info["train_resized_masks"] = sorted(ctx.resized_masks[train_set.split])
    return Record(
        schema=SCHEMA, key=job.setting.key, identity=job.setting.identity(),
        backbone={**ref.spec.to_dict(), "source": ref.source, "revision_resolved": ref.revision,
                  "weights_sha256": ref.weights_sha256(), "layer": opts.layer,
                  "normalisation_source": ref.normalisation_source,
                  **({"checkpoint": ref.checkpoint} if ref.checkpoint else {})},
        dataset={**eval_set.describe(), "n_resized_masks": len(resized), "resized_masks": resized},
        protocol={"name": proto.name, "version": proto.version, "preset": proto.preset, "params": job.params},
        transform=transform.to_dict(), seeds=job.seeds, metrics=metrics, per_seed=result.per_seed, info=info,
        confusions=result.confusions,
        image_stats=None if stats is None else {
            "what": "per seed, per image (dataset order), per class: [tp, fp, fn] after matching",
            **encode_array(stats)},
        provenance={**environment(), "ssl_segbench": __version__, "device": device,
                    "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
                    "compute_precision": compute_precision(device), "batch_size": batch_size,
                    # CPU kernels (AVX2 / AVX-512) and threads: they can move the last float bits of a number
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_threads": torch.get_num_threads(),
                    "faiss_blas": blas_config(),  # the kernel of faiss's matrix products (faiss_blas.py)
                    "extraction_ranks": plan.world.size,
                    "started": started, "wall_seconds": round(time.perf_counter() - t0, 3),
                    "shared_feature_pass_seconds": plan.seconds,
                    "scoring_seconds": round(ctx.scoring.seconds, 3),  # in the shared prediction stream
                    "passes": ctx.passes, "cache_hit": not any(p["computed"] for p in ctx.passes)})
