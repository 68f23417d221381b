"""Models of other frameworks, explained exactly as their framework runs them.

* :mod:`medcam.frameworks.nnunet`: trained nnU-Net v2 model folders (``nnunetv2`` package; imported lazily).
* :mod:`medcam.frameworks.nnunet_cases`: nnU-Net cases and cohorts in, maps out (through medcam's cohort loop).
"""

from __future__ import annotations

__all__ = ["nnunet", "nnunet_cases"]


def __getattr__(name: str):
    if name in __all__:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(name)
