"""One registry for protocols, datasets and backbone loaders (ssl_segbench/plugins.py): a decorator in the defining
module, discovery that imports every module of the package and refuses one that registers nothing."""
from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import yaml

from ssl_segbench import registry
from ssl_segbench.backbones import BackboneError, BackboneRef
from ssl_segbench.backbones.builtin import PixelsBackbone
from ssl_segbench.backbones.hf_backbone import HFBackbone
from ssl_segbench.backbones.loader import LOADERS, loader_of
from ssl_segbench.backbones.timm_backbone import TimmBackbone
from ssl_segbench.plugins import PluginError, Registry


class WidgetError(LookupError):
    pass


def _registry() -> Registry:
    return Registry("widget", "name", "register_widget", WidgetError, "list widgets")


def _widget(name, module="pkg.a"):
    return type("W", (), {"name": name, "__module__": module})


def test_a_key_registered_twice_is_refused_naming_both_modules():
    reg = _registry()
    reg.register(_widget("kmeans", "pkg.first"))
    with pytest.raises(PluginError, match=r"widget name 'kmeans' is registered twice: by pkg\.first and by "
                                          r"pkg\.second"):
        reg.register(_widget("kmeans", "pkg.second"))
    assert reg.names() == ["kmeans"] and reg.get("kmeans").__module__ == "pkg.first"  # the first one kept


@pytest.mark.parametrize("key", ["", None])
def test_an_empty_key_is_refused(key):
    reg = _registry()
    with pytest.raises(PluginError, match="widget pkg.a.W has no name"):
        reg.register(_widget(key))
    assert len(reg) == 0


def test_get_of_a_mistyped_key_is_the_registrys_error_suggesting_the_close_one():
    reg = _registry()
    for name in ("kmeans", "linear", "datus"):
        reg.register(_widget(name))
    assert "linear" in reg and "kmean" not in reg and list(reg) == ["kmeans", "linear", "datus"]
    assert reg.names() == ["datus", "kmeans", "linear"] and dict(reg.items())["datus"].name == "datus"
    with pytest.raises(WidgetError, match=r"unknown widget 'kmean'\. Did you mean 'kmeans'\? Known: datus, kmeans, "
                                          r"linear \(`list widgets` describes them\)"):
        reg.get("kmean")
    with pytest.raises(WidgetError):
        reg["kmean"]


# --- discovery of a package written to tmp_path -----------------------------------------------------------------------

_BASE = """
from ssl_segbench.plugins import Registry
WIDGETS = Registry("widget", "name", "register_widget", LookupError, "list widgets")
register_widget = WIDGETS.register
"""
_INIT = """
from .base import WIDGETS
SHARED_MODULES = {shared!r}
WIDGETS.discover(__name__, shared=SHARED_MODULES)
"""


def _widget_module(name: str) -> str:
    return f"from .base import register_widget\n\n@register_widget\nclass W:\n    name = {name!r}\n"


def _package(tmp_path, monkeypatch, modules: dict[str, str], shared=("base",)):
    """Write package `widgets` (a base module holding the registry, an __init__ that discovers) into tmp_path and
    import it afresh."""
    pkg = tmp_path / "widgets"
    pkg.mkdir(exist_ok=True)
    (pkg / "base.py").write_text(_BASE)
    (pkg / "__init__.py").write_text(_INIT.format(shared=tuple(shared)))
    for name, text in modules.items():
        (pkg / f"{name}.py").write_text(text)
    return _import_afresh(tmp_path, monkeypatch)


def _import_afresh(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in [m for m in sys.modules if m == "widgets" or m.startswith("widgets.")]:
        monkeypatch.delitem(sys.modules, mod)
    importlib.invalidate_caches()
    return importlib.import_module("widgets")


def test_discovery_finds_a_module_added_as_one_file(tmp_path, monkeypatch):
    assert _package(tmp_path, monkeypatch, {"round": _widget_module("round")}).WIDGETS.names() == ["round"]
    init = (tmp_path / "widgets" / "__init__.py").read_bytes()
    (tmp_path / "widgets" / "square.py").write_text(_widget_module("square"))  # the only edit
    pkg = _import_afresh(tmp_path, monkeypatch)
    assert pkg.WIDGETS.names() == ["round", "square"]
    assert pkg.WIDGETS.get("square").__module__ == "widgets.square"
    assert (tmp_path / "widgets" / "__init__.py").read_bytes() == init


def test_discovery_refuses_a_module_that_registers_nothing_naming_the_file(tmp_path, monkeypatch):
    modules = {"round": _widget_module("round"), "helpers": "def area(r):\n    return 3 * r * r\n"}
    with pytest.raises(PluginError) as err:
        _package(tmp_path, monkeypatch, modules)
    message = str(err.value)
    assert str(tmp_path / "widgets" / "helpers.py") in message and "registers no widget" in message
    assert "decorate its widget class with @register_widget" in message
    assert "add 'helpers' to SHARED_MODULES in widgets/__init__.py" in message
    # the second fix named there works: declared shared, it is not a widget and is not imported
    pkg = _package(tmp_path, monkeypatch, modules, shared=("base", "helpers"))
    assert pkg.WIDGETS.names() == ["round"] and "widgets.helpers" not in sys.modules


def test_discovery_refuses_a_shared_name_that_is_no_module(tmp_path, monkeypatch):
    with pytest.raises(PluginError, match=r"widgets: shared module\(s\) \['helper'\] do not exist; modules: base, "
                                          r"round"):
        _package(tmp_path, monkeypatch, {"round": _widget_module("round")}, shared=("base", "helper"))


def test_a_duplicate_across_discovered_files_names_both_modules(tmp_path, monkeypatch):
    with pytest.raises(PluginError, match=r"'round' is registered twice: by widgets\.a and by widgets\.b"):
        _package(tmp_path, monkeypatch, {"a": _widget_module("round"), "b": _widget_module("round")})


# --- the three registries of the package ---------------------------------------------------------------------------

def test_the_packages_register_every_plugin_module():
    from ssl_segbench.data import DATASETS, DatasetError
    from ssl_segbench.protocols import PROTOCOLS, ProtocolError

    assert {"kmeans", "linear", "overcluster", "retrieval", "datus"} <= set(PROTOCOLS)
    assert {"voc", "suim", "synthetic", "folder"} <= set(DATASETS) and "hf" not in DATASETS
    with pytest.raises(ProtocolError, match="Did you mean 'kmeans'"):
        PROTOCOLS.get("kmaens")
    with pytest.raises(DatasetError, match=r"Did you mean 'voc'\?.*; or hf:<org>/<name> for a Hugging Face dataset"):
        DATASETS.get("vco")


def test_backbones_yaml_loader_names_are_the_registered_loaders():
    """registry.py reads the loader names from the loaders' source (no torch to check backbones.yaml); they are the
    names the imported loader classes register."""
    assert registry.loader_names() == tuple(LOADERS.names()) == ("builtin", "checkpoint", "module", "timm",
                                                                 "transformers")
    assert LOADERS.get("timm").backbone_class is TimmBackbone
    assert LOADERS.get("transformers").backbone_class is HFBackbone
    with pytest.raises(BackboneError, match="unknown backbone loader 'tim'. Did you mean 'timm'"):
        LOADERS.get("tim")


def _one_entry_registry(path, loader: str, repo_id: str):
    entry = dict(id="toy", loader=loader, repo_id=repo_id, revision=None, patch_size=2, embed_dim=12,
                 num_prefix_tokens=0, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], method="m", paper=None, license="l")
    path.write_text(yaml.safe_dump({"backbones": [entry]}))
    return path


_TOY = textwrap.dedent("""
    from ssl_segbench.backbones.builtin import PixelsBackbone
    from ssl_segbench.backbones.loader import Loader, register_loader

    @register_loader
    class ToyLoader(Loader):
        name = "toy"
        backbone_class = PixelsBackbone

        def snapshot(self, spec):
            return None

        def pin(self, spec):
            return f"toy:{spec.repo_id}", "toy-rev-1"

        def model(self, spec, snapshot):
            return None

        def backbone(self, spec, source, revision, model):
            return PixelsBackbone(spec, source, revision)
    """)


def test_a_loader_registered_in_its_own_module_is_what_backbone_ref_uses(tmp_path, monkeypatch):
    """A toy loader in a module of its own: a registry entry naming it is pinned and loaded by it, with no other
    edit to the backbones package."""
    monkeypatch.setattr(LOADERS, "_entries", dict(LOADERS.items()))  # registered for this test only
    (tmp_path / "toy_loader.py").write_text(_TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_loader", raising=False)
    path = _one_entry_registry(tmp_path / "b.yaml", "toy", "anything")
    with pytest.raises(registry.RegistryError, match=r"backbone 'toy', key 'loader': must be one of \('builtin', "
                                                     r"'checkpoint', 'module', 'timm', 'transformers'\)"):
        BackboneRef("toy", path)  # a loader outside backbones/ is not one backbones.yaml may name
    importlib.import_module("toy_loader")
    monkeypatch.setattr(registry, "loader_names", lambda: tuple(LOADERS.names()))  # as if it were in backbones/
    ref = BackboneRef("toy", path)
    assert (ref.source, ref.revision) == ("toy:anything", "toy-rev-1")
    assert type(loader_of(ref.spec)).__name__ == "ToyLoader"
    backbone = ref.load()
    assert isinstance(backbone, PixelsBackbone) and backbone.source == "toy:anything"


def test_the_builtin_loader_pins_and_loads_the_pixel_baseline(tmp_path):
    path = _one_entry_registry(tmp_path / "b.yaml", "builtin", "pixels")
    ref = BackboneRef("toy", path)
    assert (ref.source, ref.revision) == ("builtin:pixels", None)
    assert type(ref.load()) is PixelsBackbone
    with pytest.raises(BackboneError, match=r"unknown builtin 'pixel' \(use 'pixels' or 'random-init:<timm arch>'\)"):
        BackboneRef("toy", _one_entry_registry(tmp_path / "c.yaml", "builtin", "pixel"))
