"""Optional dependencies: what serves one protocol or one feature is a pip extra of ssl-segbench, not a core
dependency, so that a training environment installs only what the core flow needs (`pip install ssl-segbench`).

`require` is the one way the package imports such a package: it returns the module, or raises `MissingExtraError`
naming the feature, the missing package and the install command of its extra. Protocols list what they need in
`Protocol.requires` (and the CRF's package when their `crf` parameter is on: `Protocol.optional_packages`), which the
runner checks while it plans a run, so a missing extra stops the run before any backbone pass. pyproject.toml's
`[project.optional-dependencies]` lists the same packages (tests/test_extras.py holds the two equal)."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import SegbenchError

# import name → (distribution name on PyPI, the extra that installs it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "infomap": ("infomap", "pseudo"),
    "sknetwork": ("scikit-network", "pseudo"),
    "skimage": ("scikit-image", "pseudo"),
    "sklearn": ("scikit-learn", "pseudo"),
    "submitit": ("submitit", "slurm"),
    "matplotlib": ("matplotlib", "site"),
    "pydensecrf": ("pydensecrf2", "crf"),
    "lightning": ("lightning", "lightning"),
}
# extras that `all` leaves out, and why
NOT_IN_ALL = {"crf": "it builds from source and needs a C++ compiler, so 'ssl-segbench[all]' leaves it out",
              "lightning": "only the Lightning callback (ssl_segbench.callback) uses it, so 'ssl-segbench[all]' "
                           "leaves it out"}


class MissingExtraError(SegbenchError):
    """A feature was used without the optional package it needs; the message names the extra to install."""


def install_command(extra: str) -> str:
    """The pip command that installs `extra` beside the package."""
    return f"pip install 'ssl-segbench[{extra}]'"


def require(module: str, feature: str) -> ModuleType:
    """Import `module` (a dotted name under one of `OPTIONAL`'s packages) for `feature` (what the user asked for, as
    they would name it: "protocol 'leopart-cd'"), or raise MissingExtraError with the command that installs it."""
    package, extra = OPTIONAL[module.partition(".")[0]]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = NOT_IN_ALL.get(extra, f"or {install_command('all')} for every optional feature")
        raise MissingExtraError(f"{feature} needs {package}, which cannot be imported here ({e}): install it with "
                                f"{install_command(extra)} ({hint})") from None
