"""ssl-segbench: how good are a backbone's patch features for semantic segmentation when no labels are used?

Data flows one way: dataset → transform → backbone → features (cached) → protocol → label maps → metrics → record →
leaderboard; each stage is one module (data/, transforms, backbones/, features, protocols/, metrics, records,
leaderboard), and runner.py is where they meet.
"""
import importlib

__version__ = "0.1.0"

# the Python API, imported on first use: `import ssl_segbench` (and the CLI's --help) stays free of torch
_API = {"evaluate": "api", "Adapter": "api", "Results": "api", "ProtocolResult": "api", "callback": "callback"}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'ssl_segbench' has no attribute '{name}'")
    module = importlib.import_module(f"{__name__}.{_API[name]}")
    return module if name == _API[name] else getattr(module, name)
