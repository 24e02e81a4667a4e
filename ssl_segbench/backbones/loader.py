"""What a backbone loader provides, and the registry of loaders.

A loader is the value of a backbones.yaml entry's `loader` key ("timm", "transformers", "builtin"): one class per
library, registered with `@register_loader` in the module that defines its `Backbone` (backbones/__init__.py discovers
them). It builds the library's model from a spec and its checkpoint files, wraps it in its `Backbone` class, pins the
checkpoint (source string and resolved revision), and, for a checkpoint named on the command line, reads its shape and
normalisation from the checkpoint's own files.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from ..fingerprint import content_sha256
from ..plugins import Registry
from ..registry import BackboneSpec
from .base import Backbone, BackboneError
from .hub import hub_file, is_hub_error, offline_hint, resolve_revision
from .weights import weights_sha256

NORMALISATION_FIX = ("state it with the run options --mean R,G,B --std R,G,B (the values the checkpoint was trained "
                     "with), or add the checkpoint to the registry (backbones.yaml, keys mean and std)")


class Loader:
    """One library's way from a spec to a `Backbone`. Subclasses set `name` and `backbone_class` and implement `model`;
    the defaults serve a checkpoint in a local directory or the Hugging Face cache."""

    name: ClassVar[str] = ""  # the backbones.yaml `loader` value
    backbone_class: ClassVar[type[Backbone]]
    source_prefix: ClassVar[str] = ""  # how a source string names this library's Hub checkpoints ("hf-hub:" for timm)
    shape_from_model: ClassVar[bool] = False  # an ad-hoc checkpoint's shape is read from the built model (not config)
    # where an ad-hoc checkpoint states its normalisation: the file, the (mean, std) keys of its `section`, in words
    normalisation_file: ClassVar[str] = ""
    normalisation_keys: ClassVar[tuple[str, str]] = ("mean", "std")
    normalisation_where: ClassVar[str] = ""

    def snapshot(self, spec: BackboneSpec) -> Path | None:
        """The directory holding the checkpoint's files: the local directory, or the Hub cache snapshot (None when
        the cache does not have it)."""
        local = Path(spec.repo_id.removeprefix("local-dir:"))
        if local.is_dir():
            return local
        try:
            return hub_file(spec.repo_id, "config.json", spec.revision, spec).parent
        except BackboneError:  # the Hub could not be reached: said now, not after the library's own retries
            raise
        except Exception:  # noqa: BLE001 - not cached: the loader's own offline message explains it
            return None

    def pin(self, spec: BackboneSpec) -> tuple[str, str | None]:
        """(source, resolved revision): a local directory's path and content digest, or the Hub id and the commit the
        cache serves."""
        if spec.repo_id.startswith("local-dir:") or Path(spec.repo_id).is_dir():
            return spec.repo_id, local_revision(Path(spec.repo_id.removeprefix("local-dir:")))
        source = self.source_prefix + spec.repo_id + (f"@{spec.revision}" if spec.revision else "")
        try:
            return source, resolve_revision(spec.repo_id, spec.revision, spec=spec)
        except Exception as e:
            if is_hub_error(e):
                raise offline_hint(spec.repo_id, spec.revision, e, spec) from e
            raise

    def weights_sha256(self, spec: BackboneSpec) -> dict[str, str] | None:
        """sha256 of each weight file of the checkpoint (file name → hex digest), for the record: its directory's."""
        return weights_sha256(self.snapshot(spec), spec.id)

    def model(self, spec: BackboneSpec, snapshot: Path | None):
        """The library's model with the checkpoint's weights (checked to fit it); `snapshot`: its files, if here."""
        raise NotImplementedError

    def backbone(self, spec: BackboneSpec, source: str, revision: str | None, model) -> Backbone:
        """`model` behind the one dense interface (its `backbone_class`), which checks it against the spec."""
        return self.backbone_class(model, spec, source, revision)

    def fill_spec(self, spec: BackboneSpec, model) -> BackboneSpec:
        """An ad-hoc spec with its shape (patch size, width, prefix tokens, depth) read from the checkpoint; `model`:
        the built model where `shape_from_model`, else None."""
        raise NotImplementedError

    def section(self, cfg: dict, path: Path, name: str) -> dict:
        """The part of the normalisation file that holds the mean/std keys (refusing one that says not to
        normalise)."""
        return cfg


def local_revision(directory: Path) -> str:
    """Content identity of a local checkpoint directory: sha256 over its files' names and bytes (each file's digest
    remembered while the file is unchanged, as for datasets)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    digest = content_sha256({"kind": "checkpoint"}, [(f.relative_to(directory).as_posix(), f) for f in files],
                            directory, f"checkpoint {directory.name}")
    return "local-sha256:" + digest[:16]


# loader name → Loader class; registry.py checks backbones.yaml's `loader` values against the names these classes state
LOADERS = Registry("backbone loader", "name", "register_loader", BackboneError, "the loader key of backbones.yaml")
register_loader = LOADERS.register


def loader_of(spec: BackboneSpec) -> Loader:
    """The loader a spec names (registry entries are checked on load, so an unknown one is a spec made in code)."""
    return LOADERS.get(spec.loader)()
