"""kangaroo: lossless self-speculative decoding via double early exiting (Liu et al., 2024).

Public API (imported lazily so that ``kangaroo --help`` stays fast)::

    from kangaroo import KangarooModel, KangarooConfig, KangarooError
"""

__version__ = "0.1.0"

_EXPORTS = {
    "KangarooModel": "kangaroo.api",
    "KangarooConfig": "kangaroo.config",
    "SamplingConfig": "kangaroo.config",
    "KangarooError": "kangaroo.errors",
    "Adapter": "kangaroo.adapter",
    "AdapterConfig": "kangaroo.adapter",
    "Backbone": "kangaroo.model",
    "KangarooDecoder": "kangaroo.decoding",
    "AutoregressiveDecoder": "kangaroo.decoding",
    "load_model": "kangaroo.loading",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kangaroo' has no attribute {name!r}")
