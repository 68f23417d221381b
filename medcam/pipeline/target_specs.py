"""Target specs: parsing ``--target`` strings (``ET``, ``TC:component=largest``, ``mask:``, ``box:``, ``label:``) into
targets.

Per-case masks: a ``mask:`` path holding ``{...}`` placeholders is a template filled in for each case -
``{case}`` (the case id), ``{folder}`` (the case's folder) or the name of a manifest column (e.g. ``{mask}``; its
value is relative to the CSV). ``label:ET`` takes the ROI from the case's own label file (``seg``; BraTS label
conventions, regions TC/WT/ET). One mask file for a cohort of several cases is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import TargetError
from ..runner import OutputActivation
from ..targets import ClassROI, ComponentROI, MaskROI, PredictedROI, Target
from ..types import PathLike, literal_value


@dataclass(frozen=True)
class TargetSpec:
    """A parsed ``--target``.

    Attributes:
        text: the spec as given.
        kind: ``"predicted"``, ``"class"``, ``"component"``, ``"mask"``, ``"box"`` or ``"label"``.
        channel: output channel.
        region: the channel's name (``"ET"``) or ``"ch<N>"``.
        rank: component rank (1 = largest) for ``"component"``.
        path: mask file (ORIGINAL image grid) for ``"mask"``.
        box: ``((x0, y0, z0), (x1, y1, z1))`` voxel indices of the ORIGINAL grid, half-open, for ``"box"``.
        label: the reference region (``"TC"``, ``"WT"``, ``"ET"``) of the case's label file, for ``"label"``.
    """

    text: str
    kind: str
    channel: int
    region: str
    rank: int | None = None
    path: str | None = None
    box: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    label: str | None = None
    template: str | None = None

    @property
    def is_template(self) -> bool:
        """True for a per-case mask whose path still holds ``{...}`` placeholders."""
        return self.kind == "mask" and "{" in str(self.path)

    @property
    def name(self) -> str:
        """File-name-safe short name: ``ET``, ``ET-class``, ``ET-component1``, ``mask-lesion-WT``, ``box-WT``."""
        if self.kind == "predicted":
            return self.region
        if self.kind == "class":
            return f"{self.region}-class"
        if self.kind == "component":
            return f"{self.region}-component{self.rank}"
        if self.kind == "mask":
            from ..data.loading import strip_image_suffix

            raw = strip_image_suffix(Path(str(self.template or self.path)).name)
            stem = re.sub(r"[^A-Za-z0-9]+", "", re.sub(r"\{[^}]*\}", "", raw))[:20] or "roi"
            return f"mask-{stem}-{self.region}"
        if self.kind == "label":
            return f"label-{self.label}-{self.region}"
        return f"box-{self.region}"


def _channel_of(token: str, regions: Sequence[str], spec: str) -> tuple[int, str]:
    lower = [r.lower() for r in regions]
    if token.lower() in lower:
        i = lower.index(token.lower())
        return i, regions[i]
    m = re.fullmatch(r"(?:channel[:=]?|ch)(\d+)", token.strip(), flags=re.IGNORECASE)
    if m:
        i = int(m.group(1))
        if regions and i >= len(regions):
            raise TargetError(f"--target {spec!r}: channel {i} is out of range for regions {', '.join(regions)}")
        return i, regions[i] if regions else f"ch{i}"
    names = ", ".join(regions) if regions else "none (this model's regions are unnamed; pass --regions)"
    raise TargetError(f"--target {spec!r}: unknown region {token!r}; known regions: {names}; or use channel:N")


def _default_region(regions: Sequence[str], spec: str) -> tuple[int, str]:
    if "WT" in regions:
        return regions.index("WT"), "WT"
    if len(regions) == 1:
        return 0, regions[0]
    raise TargetError(
        f"--target {spec!r}: say which output region the ROI is on, e.g. {spec}:{regions[0] if regions else 'channel:0'}"
    )


def parse_target(spec: str, regions: Sequence[str] = ()) -> TargetSpec:
    """Parse one ``--target`` string (grammar in the module docstring).

    Args:
        spec: e.g. ``"ET"``, ``"WT:predicted"``, ``"TC:component=largest"``, ``"ET:class"``, ``"channel:2"``,
            ``"mask:roi.nii.gz:WT"``, ``"box:10,20,30:40,50,60:ET"``.
        regions: names of the model's output channels, in order.

    Raises:
        TargetError: unknown region name, bad mode, bad box, missing mask file.
    """
    text = spec.strip()
    if not text:
        raise TargetError("--target is empty; e.g. --target ET")
    regions = tuple(regions)
    head = text.split(":", 1)[0].lower()
    if head == "mask":
        return _parse_mask(spec, text, regions)
    if head == "label":
        return _parse_label(spec, text, regions)
    if head == "box":
        return _parse_box(spec, text, regions)
    return _parse_region(spec, text, regions)


def _output_channel(token: str | None, regions: Sequence[str], spec: str) -> tuple[int, str]:
    """The output channel named by ``token``, or the default region (WT, or the only one) when it is None."""
    return _channel_of(token, regions, spec) if token else _default_region(regions, spec)


def _parse_mask(spec: str, text: str, regions: Sequence[str]) -> TargetSpec:
    """``mask:FILE[:REGION]``; FILE may be a per-case template with ``{...}`` placeholders."""
    rest = text[5:]
    region_token = None
    if ":" in rest:
        path_part, last = rest.rsplit(":", 1)
        if last and not last.lower().endswith((".nii", ".gz", ".nrrd", ".mha", ".mhd")):
            rest, region_token = path_part, last
    if not rest:
        raise TargetError(f"--target {spec!r}: give the mask file, e.g. mask:lesion.nii.gz:WT")
    if "{" in rest:  # a per-case template, filled in by case_specs
        bad = [f for f in re.findall(r"\{([^}]*)\}", rest) if not f.isidentifier()]
        if bad or rest.count("{") != rest.count("}"):
            raise TargetError(
                f"--target {spec!r}: placeholders are {{case}}, {{folder}} or a manifest column like {{mask}}"
            )
        ch, reg = _output_channel(region_token, regions, spec)
        return TargetSpec(text, "mask", ch, reg, path=str(rest), template=str(rest))
    if not Path(rest).exists():
        raise TargetError(f"--target {spec!r}: mask file '{rest}' does not exist")
    ch, reg = _output_channel(region_token, regions, spec)
    return TargetSpec(text, "mask", ch, reg, path=str(rest))


def _parse_label(spec: str, text: str, regions: Sequence[str]) -> TargetSpec:
    """``label:REGION[:OUTPUT]``: the ROI from the case's own label file."""
    from ..data.brats import REGIONS as LABEL_REGIONS

    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[1].upper() not in LABEL_REGIONS:
        raise TargetError(
            f"--target {spec!r}: expected label:REGION[:OUTPUT] with REGION one of {', '.join(LABEL_REGIONS)} "
            "(from the case's seg file)"
        )
    lab = parts[1].upper()
    if len(parts) == 3:
        ch, reg = _channel_of(parts[2], regions, spec)
    elif lab.lower() in [r.lower() for r in regions]:
        ch, reg = _channel_of(lab, regions, spec)
    else:
        ch, reg = _default_region(regions, spec)
    return TargetSpec(text, "label", ch, reg, label=lab)


def _parse_box(spec: str, text: str, regions: Sequence[str]) -> TargetSpec:
    """``box:x0,y0,z0:x1,y1,z1[:REGION]`` (voxel indices of the original grid, half-open)."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise TargetError(f"--target {spec!r}: expected box:x0,y0,z0:x1,y1,z1[:REGION]")
    try:
        start = tuple(int(v) for v in parts[1].split(","))
        stop = tuple(int(v) for v in parts[2].split(","))
    except ValueError as e:
        raise TargetError(f"--target {spec!r}: box corners must be integers, e.g. box:10,20,30:40,50,60:WT") from e
    if len(start) != 3 or len(stop) != 3 or any(a < 0 or a >= b for a, b in zip(start, stop)):
        raise TargetError(f"--target {spec!r}: need 3 integers per corner with 0 <= x0 < x1 (half-open box)")
    ch, reg = _output_channel(parts[3] if len(parts) == 4 else None, regions, spec)
    return TargetSpec(text, "box", ch, reg, box=(start, stop))


def _parse_region(spec: str, text: str, regions: Sequence[str]) -> TargetSpec:
    """``REGION[:mode]`` or ``channel:N[:mode]`` with mode predicted (default), class or component[=largest|N]."""
    parts = text.split(":")
    if parts[0].lower() == "channel":
        if len(parts) < 2 or not parts[1].isdigit():
            raise TargetError(f"--target {spec!r}: expected channel:N[:predicted|class|component=largest|N]")
        token, modes = f"ch{parts[1]}", parts[2:]
    else:
        token, modes = parts[0], parts[1:]
    ch, reg = _channel_of(token, regions, spec)
    if len(modes) > 1:
        raise TargetError(f"--target {spec!r}: too many ':' parts; e.g. ET, ET:class, ET:component=largest")
    mode = modes[0].strip().lower() if modes else "predicted"
    if mode == "predicted":
        return TargetSpec(text, "predicted", ch, reg)
    if mode == "class":
        return TargetSpec(text, "class", ch, reg)
    m = re.fullmatch(r"component(?:=(largest|\d+))?", mode)
    if m:
        val = m.group(1) or "largest"
        rank = 1 if val == "largest" else int(val)
        if rank < 1:
            raise TargetError(f"--target {spec!r}: component ranks start at 1 (1 = largest)")
        return TargetSpec(text, "component", ch, reg, rank=rank)
    raise TargetError(
        f"--target {spec!r}: unknown mode {modes[0]!r}; use predicted, class, component=largest or component=N"
    )


def parse_targets(specs: Iterable[str], regions: Sequence[str] = ()) -> list[TargetSpec]:
    """Parse several specs; duplicates are refused (they would write the same files)."""
    out = [parse_target(s, regions) for s in specs]
    names = [t.name for t in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TargetError(f"targets {dup} are given twice (or map to the same output name)")
    if not out:
        raise TargetError("no targets given: pass e.g. --target ET")
    return out


def default_targets(regions: Sequence[str]) -> list[TargetSpec]:
    """The predicted region of every named output channel (demo: TC, WT, ET) but a ``background`` one (nnU-Net's
    label 0)."""
    if not regions:
        raise TargetError(
            "no --target given and the model's output channels are unnamed: pass --target channel:N "
            "or name the channels with --regions"
        )
    return parse_targets([r for r in regions if r.lower() != "background"] or list(regions), regions)


def label_on_case_grid(case: Any, spec: TargetSpec) -> np.ndarray:
    """``label:REGION``: the case's own reference region (TC/WT/ET from its seg file), float32 0/1 on the
    preprocessed grid (the label went through the case's preprocessing with nearest-neighbour resampling)."""
    from ..data.brats import REGIONS as LABEL_REGIONS

    label = getattr(case, "label", None)
    if label is None:
        raise TargetError(
            f"--target {spec.text!r}: case {case.case_id} has no label file (a BraTS '_seg' / 'seg' file, or a "
            "'seg' manifest column)"
        )
    arr = label[LABEL_REGIONS.index(str(spec.label))]
    arr = arr.detach().cpu().numpy() if hasattr(arr, "detach") else np.asarray(arr)
    res = (arr > 0.5).astype(np.float32)
    if not res.any():
        raise TargetError(f"--target {spec.text!r}: case {case.case_id} has no {spec.label} voxels in its label file")
    return res


def roi_on_original_grid(
    spec: TargetSpec, reference: PathLike, case_id: str, seg: PathLike | None = None
) -> np.ndarray:
    """The ROI of a ``mask``/``box``/``label`` spec on the ORIGINAL grid of ``reference`` (nibabel's axis order
    ``[X, Y, Z]``: boxes are given as voxel indices i, j, k), float32 0/1. ``label:REGION`` reads the case's label
    file ``seg`` (BraTS labels -> TC/WT/ET).

    Raises:
        TargetError: a mask not on the reference grid, an empty mask, a box outside it, a missing label file or
            region.
    """
    from ..data.loading import check_same_grid, read_header, read_volume

    ref = read_header(reference)
    if spec.kind == "box":
        if spec.box is None:
            raise TargetError(f"--target {spec.text!r}: the box target has no corners; e.g. box:10,20,30:40,50,60:WT")
        start, stop = spec.box
        if len(start) != len(ref.shape) or any(b > s for b, s in zip(stop, ref.shape)):
            raise TargetError(f"--target {spec.text!r}: box stop {stop} lies outside the image grid {ref.shape}")
        box = np.zeros(ref.shape, np.float32)
        box[tuple(slice(a, b) for a, b in zip(start, stop))] = 1
        return box
    path = spec.path if spec.kind == "mask" else seg
    if path is None:
        raise TargetError(
            f"--target {spec.text!r}: the mask target has no file; e.g. mask:lesion.nii.gz:WT"
            if spec.kind == "mask"
            else f"--target {spec.text!r}: case {case_id} has no label file (a BraTS '_seg' / 'seg' file, or a "
            "'seg' manifest column)"
        )
    hdr = read_header(path)
    try:
        check_same_grid([ref, hdr])
    except Exception as e:
        raise TargetError(
            f"--target {spec.text!r}: '{Path(path).name}' must be on the original image grid of case {case_id} "
            f"(shape {ref.shape}, same affine as '{ref.path.name}'); got shape {hdr.shape}"
            + ("" if hdr.shape != ref.shape else " with a different affine")
        ) from e
    arr = read_volume(path, is_label=True).as_tensor().numpy()
    if spec.kind == "mask":
        if not (arr != 0).any():
            raise TargetError(f"--target {spec.text!r}: the mask is empty (all zero)")
        return (arr != 0).astype(np.float32)
    from ..data.brats import REGIONS, infer_label_convention, labels_to_regions

    regions = labels_to_regions(arr, infer_label_convention(np.unique(arr).tolist()))
    res = np.asarray(regions[REGIONS.index(str(spec.label))]).astype(np.float32)
    if not res.any():
        raise TargetError(f"--target {spec.text!r}: case {case_id} has no {spec.label} voxels in its label file")
    return res


def mask_on_case_grid(case: Any, spec: TargetSpec) -> np.ndarray:
    """A mask/box given on the ORIGINAL grid -> float32 0/1 ``[X', Y', Z']`` on the preprocessed grid."""
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch

    arr = torch.from_numpy(roi_on_original_grid(spec, case.reference_path, case.case_id))[None]
    src = MetaTensor(arr, affine=torch.as_tensor(np.asarray(case.original_affine, float)))
    dst = MetaTensor(case.image[:1].as_tensor(), affine=case.image.affine)
    out = ResampleToMatch(mode="nearest", padding_mode="zeros")(src, img_dst=dst)
    res = np.asarray(out.detach().cpu().numpy() if hasattr(out, "detach") else out)[0].astype(np.float32)
    if not res.any():
        raise TargetError(f"--target {spec.text!r}: the ROI falls outside the preprocessed field of view")
    return res


def _case_fields(source: Any) -> dict[str, str]:
    fields = {"case": str(source.case_id)}
    if source.kind == "brats_folder":
        fields["folder"] = str(source.source)
    else:
        first = next(iter(source.source.values())) if isinstance(source.source, dict) else source.source[0]
        fields["folder"] = str(Path(first).parent)
    fields.update(dict(getattr(source, "fields", ()) or ()))
    return fields


def case_specs(specs: Sequence[TargetSpec], source: Any) -> list[TargetSpec]:
    """The specs for one case: mask templates filled in with the case's fields (``{case}``, ``{folder}``, manifest
    columns); other specs unchanged. A relative path is relative to the current folder, else to the folder holding
    the case folder (the cohort folder), so ``mask:{case}/{case}_seg.nii.gz`` works from either.

    Raises:
        TargetError: unknown placeholder, or the case's mask file does not exist (naming the case).
    """
    import dataclasses

    fields = None
    out = []
    for s in specs:
        if s.is_template:
            fields = fields if fields is not None else _case_fields(source)
            try:
                path = str(s.template).format(**fields)
            except (KeyError, IndexError) as e:
                raise TargetError(
                    f"--target {s.text!r}: case {source.case_id} has no field {e}; placeholders are "
                    f"{', '.join('{' + k + '}' for k in fields)}"
                ) from None
            beside = Path(fields["folder"]).parent / path  # relative to the cohort folder, when not to the cwd
            if not Path(path).is_file() and not Path(path).is_absolute() and beside.is_file():
                path = str(beside)
            if not Path(path).is_file():
                raise TargetError(f"--target {s.text!r}: the mask of case {source.case_id}, '{path}', does not exist")
            s = dataclasses.replace(s, path=path)
        out.append(s)
    return out


def check_masks_for_cohort(specs: Sequence[TargetSpec], n_cases: int) -> None:
    """One mask file applied to several cases is refused: every case needs its own (a template or ``label:``)."""
    single = [s for s in specs if s.kind == "mask" and not s.is_template]
    if single and n_cases > 1:
        raise TargetError(
            f"--target {single[0].text!r}: one mask file for {n_cases} cases would be applied to every case; give "
            "each case its own mask with a template (mask:{case}/{case}_seg.nii.gz:WT, mask:{folder}/roi.nii.gz, "
            "or a manifest column: mask:{mask}) or use the case's own labels (label:WT)"
        )


def build_targets(
    specs: Sequence[TargetSpec],
    case: Any,
    *,
    activation: str = "sigmoid",
    threshold: float | None = None,
    masks: Sequence[Any] | None = None,
) -> list[Target]:
    """Targets for ``case`` (masks and boxes resampled onto ``case.image``'s grid).

    Args:
        masks: the ROIs ``[*S]`` of the mask/box/label specs on the model's grid, in their order, when the framework
            takes them there itself (nnU-Net's preprocessor); default: resampled here.

    Returns:
        one :class:`~medcam.targets.Target` per spec, in order.
    """
    act: OutputActivation = literal_value(activation, OutputActivation, "activation", TargetError)
    out: list[Target] = []
    given = iter(masks or ())
    for s in specs:
        if s.kind == "predicted":
            out.append(PredictedROI(s.channel, activation=act, threshold=threshold))
        elif s.kind == "class":
            out.append(ClassROI(s.channel))
        elif s.kind == "component":
            rank = s.rank if s.rank is not None else 1  # a spec made without a rank: the largest component
            out.append(ComponentROI(s.channel, which=rank - 1, activation=act, threshold=threshold))
        elif masks is not None:
            out.append(MaskROI(next(given), s.channel))
        elif s.kind == "label":
            out.append(MaskROI(label_on_case_grid(case, s), s.channel))
        else:
            out.append(MaskROI(mask_on_case_grid(case, s), s.channel))
    return out
