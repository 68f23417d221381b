"""The functions behind the ``medcam`` command line: load a model, parse target specs, explain cases and cohorts.

Everything here is usable from Python too::

    from medcam.pipeline import load_model, parse_targets, load_case, explain_case

    loaded = load_model("demo")                                   # or "pkg.module:factory", or a bundle folder
    case = load_case("BraTS2021_00000/", loaded)                  # preprocessed with the model's settings
    specs = parse_targets(["ET", "WT:class", "TC:component=largest"], loaded.regions)
    summary = explain_case(case, loaded, ["hirescam"], specs, out_dir="out/BraTS2021_00000")

Per case the output folder holds (all written atomically; an existing case folder is never overwritten unless
``overwrite=True``)::

    <case>/summary.json                    targets, ROI voxel counts, scores, layer, timings, versions
    <case>/heatmaps/<method>_<target>.nii.gz  float32 maps on the ORIGINAL image grid (shape + affine of the input)
    <case>/overlays/<method>_<target>.png  axial/coronal/sagittal overlays on the ORIGINAL grid, in mm, radiological
                                           convention, one colour scale per case (see :mod:`medcam.io.overlays`)
    <case>/montage.png                     rows = targets, columns = methods, three views each
    <case>/segmentation.nii.gz             the model's prediction on the ORIGINAL grid, integer labels (the
                                           framework's own: argmax labels, nnU-Net's labels; sigmoid models: value =
                                           sum of 2**c over the predicted channels c)
    <case>/slicer/scene.mrml ...           self-contained 3D Slicer folder (see :mod:`medcam.io.slicer`)

Target specs (``parse_target``), for a model whose output channels are named by ``regions`` (demo/BraTS:
TC = 0, WT = 1, ET = 2, sigmoid outputs):

* ``ET`` or ``ET:predicted`` - the voxels the model predicts as ET (``sigmoid(y) > threshold``), score on logits;
* ``ET:class`` - every voxel of the ET channel (the original Seg-Grad-CAM target);
* ``ET:component=largest`` / ``ET:component=2`` - one connected component of the predicted ET region, ``N`` = rank by
  size starting at 1 (1 = largest);
* ``mask:lesion.nii.gz[:WT]`` - a binary mask (non-zero = ROI) given ON THE ORIGINAL IMAGE GRID (same shape and
  affine as the input images); it is mapped to the preprocessed grid by MONAI ``ResampleToMatch`` with
  nearest-neighbour interpolation, i.e. the geometry of the case's own preprocessing. Region default: WT when the
  model has such a region, else the model must have a single output channel;
* ``box:x0,y0,z0:x1,y1,z1[:WT]`` - a box of voxel indices of the ORIGINAL grid, ``x0 <= i < x1`` (half-open), mapped
  like a mask;
* ``channel:N[:predicted|class|component=...]`` - the same by output channel number, for any model.

Every model goes through this one pipeline; what differs between frameworks is its adapter
(:mod:`medcam.frameworks.base`; :mod:`~medcam.pipeline.adapters` for demo/factory networks and MONAI bundles,
:mod:`medcam.frameworks.nnunet` for ``--model nnunet:FOLDER``; ``docs/frameworks.md``).

Modules: :mod:`~medcam.pipeline.settings` (:class:`RunSettings`, checks before the first case),
:mod:`~medcam.pipeline.models` (model loading), :mod:`~medcam.pipeline.target_specs` (``--target`` parsing),
:mod:`~medcam.pipeline.cases` (case discovery and loading), :mod:`~medcam.pipeline.cohort` (the cohort loop of
explain and evaluate), :mod:`~medcam.pipeline.run` (explaining cases and cohorts), :mod:`~medcam.pipeline.evaluate`
(scoring them), :mod:`~medcam.pipeline.errors` (:class:`PipelineError`), :mod:`~medcam.pipeline.executors` (who runs
a cohort's cases: this process, or Ray workers with :mod:`~medcam.pipeline.ray_executor`, ``explain_cohort(...,
executor="ray")``); everything but the Ray executor (which needs ``ray``) and evaluate is re-exported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..geometry import spacing_of
    from ..types import PathLike
    from .adapters import predict
    from .cases import CaseLayout, CaseSource, discover_cases, load_case, split_parts
    from .cohort import SUMMARY_NAME, json_key, process_case, read_summary, run_cohort, staged_case_dir, versions
    from .errors import PipelineError
    from .executors import LocalExecutor, resolve_executor
    from .models import LoadedModel, load_model, load_state_dict_file
    from .run import METHOD_LABELS, ExplainWork, explain_case, explain_cohort, explain_files
    from .settings import Prepared, RunSettings, make_inferer, prepare, resolve_device, sliding_settings
    from .target_specs import TargetSpec, build_targets, default_targets, mask_on_case_grid, parse_target, parse_targets

#: where each public name lives: imported on first use (PEP 562), so that ``medcam.pipeline.cases`` (case discovery)
#: can be imported without torch and MONAI; the command line checks the inputs' files before those imports
_LAZY: dict[str, str] = {
    "spacing_of": "..geometry",
    "PathLike": "..types",
    "predict": ".adapters",
    "CaseLayout": ".cases",
    "CaseSource": ".cases",
    "discover_cases": ".cases",
    "load_case": ".cases",
    "split_parts": ".cases",
    "SUMMARY_NAME": ".cohort",
    "json_key": ".cohort",
    "process_case": ".cohort",
    "read_summary": ".cohort",
    "run_cohort": ".cohort",
    "staged_case_dir": ".cohort",
    "versions": ".cohort",
    "PipelineError": ".errors",
    "LocalExecutor": ".executors",
    "resolve_executor": ".executors",
    "LoadedModel": ".models",
    "load_model": ".models",
    "load_state_dict_file": ".models",
    "METHOD_LABELS": ".run",
    "ExplainWork": ".run",
    "explain_case": ".run",
    "explain_cohort": ".run",
    "explain_files": ".run",
    "Prepared": ".settings",
    "RunSettings": ".settings",
    "make_inferer": ".settings",
    "prepare": ".settings",
    "resolve_device": ".settings",
    "sliding_settings": ".settings",
    "TargetSpec": ".target_specs",
    "build_targets": ".target_specs",
    "default_targets": ".target_specs",
    "mask_on_case_grid": ".target_specs",
    "parse_target": ".target_specs",
    "parse_targets": ".target_specs",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # imported once
    return value


__all__ = [
    "resolve_device",
    "LoadedModel",
    "TargetSpec",
    "CaseSource",
    "CaseLayout",
    "PipelineError",
    "METHOD_LABELS",
    "load_model",
    "parse_target",
    "parse_targets",
    "default_targets",
    "build_targets",
    "discover_cases",
    "load_case",
    "make_inferer",
    "sliding_settings",
    "predict",
    "explain_case",
    "explain_cohort",
    "ExplainWork",
    "LocalExecutor",
    "resolve_executor",
    "split_parts",
    "versions",
    "load_state_dict_file",
    "read_summary",
    "json_key",
    "SUMMARY_NAME",
    "PathLike",
    "spacing_of",
    "mask_on_case_grid",
    "run_cohort",
    "process_case",
    "staged_case_dir",
    "RunSettings",
    "Prepared",
    "prepare",
    "explain_files",
]
