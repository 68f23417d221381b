"""Models of other frameworks, explained exactly as their framework runs them.

* :mod:`medcam.frameworks.nnunet`: trained nnU-Net v2 model folders (``nnunetv2`` package; imported lazily).
"""

from __future__ import annotations

__all__ = ["nnunet"]


def __getattr__(name: str):
    if name == "nnunet":
        import importlib

        return importlib.import_module(".nnunet", __name__)
    raise AttributeError(name)
