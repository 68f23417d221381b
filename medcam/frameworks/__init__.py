"""Models of other frameworks, explained exactly as their framework runs them, each an adapter of the one case
pipeline (:mod:`medcam.frameworks.base`).

* :mod:`medcam.frameworks.base`: the adapter protocol (:class:`~medcam.frameworks.base.FrameworkAdapter`), the
  :class:`~medcam.frameworks.base.Activation` and :class:`~medcam.frameworks.base.Framework` types.
* :mod:`medcam.frameworks.nnunet`: trained nnU-Net v2 model folders, the nnU-Net adapter (``medcam explain --model
  nnunet:FOLDER``; ``nnunetv2`` package, imported lazily).
"""

from __future__ import annotations

__all__ = ["base", "nnunet"]


def __getattr__(name: str):
    if name in __all__:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(name)
