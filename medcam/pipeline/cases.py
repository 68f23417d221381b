"""Case discovery: BraTS folders, cohorts, CSV manifests and image files; loading cases; splitting cohorts."""

from __future__ import annotations

import csv
import dataclasses
import enum
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..types import PathLike
from .errors import PipelineError

logger = logging.getLogger(__package__)  # "medcam.pipeline", as before the split


class CaseLayout(str, enum.Enum):
    """How a case's files were given: a BraTS case folder, a BraTS modality -> file mapping (a manifest row), or
    image files in channel order. A ``str`` enum (``CaseLayout.VOLUMES == "volumes"``)."""

    BRATS_FOLDER = "brats_folder"
    BRATS_MAPPING = "brats_mapping"
    VOLUMES = "volumes"


@dataclass(frozen=True)
class CaseSource:
    """Where one case comes from, with its files resolved once (at discovery).

    Attributes:
        case_id: identifier (output sub-folder name).
        kind: the :class:`CaseLayout` (a plain string is converted).
        source: folder path, modality -> path mapping, or list of channel files, as given.
        fields: extra manifest columns of the case (``mask...`` columns), as ``(name, path)`` pairs; they fill
            ``{name}`` placeholders of per-case ``--target mask:`` templates.
        files: the case's files: BraTS modality (``t1``, ``t1ce``, ``t2``, ``flair``, ``seg``) -> path, or
            ``ch0``, ``ch1``, ... -> path for image files (channel order). Resolved from ``source`` when not given;
            empty for a BraTS folder that cannot be read (its error is raised when the case is loaded).
    """

    case_id: str
    kind: CaseLayout
    source: Any
    fields: tuple[tuple[str, str], ...] = ()
    files: Mapping[str, Path] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", CaseLayout(self.kind))
        if not self.files:
            object.__setattr__(self, "files", _resolve_files(self.kind, self.source))

    @property
    def folder(self) -> Path | None:
        """The case folder (BraTS folder cases), else None."""
        return Path(self.source) if self.kind is CaseLayout.BRATS_FOLDER else None

    def channel_files(self) -> list[Path]:
        """The image files (no label), in the order of :attr:`files`."""
        return [p for k, p in self.files.items() if k != "seg"]

    def files_in_order(self, modalities: Sequence[str]) -> list[Path]:
        """The image files in a model's channel order: image-file cases as given; BraTS cases by ``modalities``
        (one per model channel, e.g. ``("t1", "t1ce", "t2", "flair")``), from the files resolved at discovery.

        Raises:
            PipelineError: a modality the case has no file of.
        """
        found = dict(self.require_files())
        if self.kind is CaseLayout.VOLUMES:
            return self.channel_files()
        missing = [m for m in modalities if m not in found]
        if missing:
            raise PipelineError(f"case {self.case_id} has no {missing[0]} image (channel order {tuple(modalities)})")
        return [Path(found[m]) for m in modalities]

    def require_files(self) -> Mapping[str, Path]:
        """:attr:`files`, or the reading error of a broken BraTS folder (MedcamDataError)."""
        if not self.files:
            return _resolve_files(self.kind, self.source, strict=True)
        return self.files

    def describe(self) -> Any:
        if isinstance(self.source, Mapping):
            return {k: str(v) for k, v in self.source.items()}
        if isinstance(self.source, (list, tuple)):
            return [str(v) for v in self.source]
        return str(self.source)


def _resolve_files(kind: CaseLayout, source: Any, strict: bool = False) -> dict[str, Path]:
    """The files of a case source (module-level so that a source is resolved once, at its creation)."""
    from ..brats_layout import _normalise_mapping, discover_brats_case
    from ..errors import MedcamDataError

    if kind is CaseLayout.VOLUMES:
        return {f"ch{i}": Path(p) for i, p in enumerate(source)}
    try:
        if kind is CaseLayout.BRATS_MAPPING:
            return dict(_normalise_mapping(source))
        return {k: Path(v) for k, v in discover_brats_case(source)[2].items()}
    except MedcamDataError:
        if strict:
            raise
        return {}


_BRATS_KEYS = {"t1", "t1n", "t1w", "t1ce", "t1c", "t1gd", "t2", "t2w", "flair", "t2f"}
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_id(name: str) -> str:
    out = _SAFE_ID.sub("_", name).strip("._")
    return out or "case"


def _case_id(name: str, source: PathLike) -> str:
    """The case id (output sub-folder name) for ``name``: letters, digits, ``.``, ``_`` and ``-`` only, other
    characters replaced by ``_`` with a warning naming both (so that two runs of one cohort agree on it)."""
    out = _safe_id(name)
    if out != name:
        logger.warning(
            "case %r (%s) is written as case id %r: case ids keep letters, digits, '.', '_' and '-' only "
            "(name it with --case-id or a CSV manifest's case_id column)",
            name,
            source,
            out,
        )
    return out


def _folder_case_id(folder: Path, name: str) -> str:
    """The case id of a case folder whose files gave ``name``; a folder reached through a symbolic link whose name
    differs from its target's gets the target's name, with a warning saying so."""
    given = Path(os.path.abspath(folder)).name
    if given and given != name and Path(os.path.abspath(folder)).is_symlink() and folder.resolve().name == name:
        logger.warning(
            "case folder %s is a symbolic link to %s: its case id is the target's name %r, not %r (name it with "
            "--case-id or a CSV manifest's case_id column)",
            folder,
            folder.resolve(),
            name,
            given,
        )
    return _case_id(name, folder)


def id_from_files(files: Sequence[PathLike]) -> str:
    """Case id for image files: the first file's name without extension, or, when the files are named after the
    modality alone (``t1.nii.gz``, ``flair.nii.gz``, ...), the name of their folder (not ``t1``)."""
    from ..brats_layout import MODALITY_ALIASES, strip_image_suffix

    first = Path(files[0])
    stem = strip_image_suffix(first.name)
    if stem.lower() in MODALITY_ALIASES:
        return _folder_case_id(first.parent, first.resolve().parent.name)
    return _case_id(stem, first)


def _is_field(column: str) -> bool:
    """Manifest columns that are not image channels: ``mask``, ``mask_...`` (per-case target masks)."""
    return column == "mask" or column.startswith("mask_")


def _read_manifest(path: Path) -> list[CaseSource]:
    """CSV with a header: optional ``case_id``; either ``folder`` (a BraTS case folder) or one column per channel.

    Channel columns named t1, t1ce, t2, flair (2023 names accepted; optional ``seg``) make a BraTS case; any other
    columns are image files in column order, except ``mask`` / ``mask_*`` columns: per-case mask files for
    ``--target mask:{mask}``. Relative paths are relative to the CSV's folder.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PipelineError(f"cannot read manifest '{path}' ({type(e).__name__}: {e})") from e
    if not rows:
        raise PipelineError(f"manifest '{path}' has no rows (expected a header line and one line per case)")
    base = path.parent
    cases = []
    for i, row in enumerate(rows, start=2):
        row = {str(k).strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        cid = row.pop("case_id", "") or row.pop("case", "")
        row.pop("case", None)

        def p(v: str) -> Path:
            q = Path(v).expanduser()
            return q if q.is_absolute() else base / q

        fields = tuple((k, str(p(v))) for k, v in row.items() if v and _is_field(k))
        if row.get("folder"):
            folder = p(row["folder"])
            cases.append(CaseSource(_case_id(cid or folder.name, path), CaseLayout.BRATS_FOLDER, folder, fields))
            continue
        cols = {k: v for k, v in row.items() if v and k != "folder" and not _is_field(k)}
        if not cols:
            raise PipelineError(f"manifest '{path}' line {i}: no 'folder' and no image columns")
        if set(cols) - {"seg", "label"} <= _BRATS_KEYS and len(set(cols) - {"seg", "label"}) == 4:
            mapping = {k: p(v) for k, v in cols.items()}
            first = next(iter(mapping.values()))
            cases.append(
                CaseSource(
                    _case_id(cid, path) if cid else id_from_files([first]), CaseLayout.BRATS_MAPPING, mapping, fields
                )
            )
        else:
            files = [p(v) for k, v in cols.items() if k not in ("seg", "label")]
            cid = _case_id(cid, path) if cid else id_from_files(files)
            cases.append(CaseSource(cid, CaseLayout.VOLUMES, files, fields))
    return cases


def discover_cases(inputs: Sequence[PathLike], case_id: str | None = None) -> list[CaseSource]:
    """Turn the ``explain`` inputs into cases.

    ``case_id`` names the case when the inputs form ONE case (image files or a case folder); refused for a cohort.

    * one folder that is a BraTS case (``<ID>_t1.nii.gz`` ... or ``<ID>-t1n.nii.gz`` ...) -> that case;
    * one folder whose sub-folders are BraTS cases -> a cohort (sorted by name; other sub-folders are ignored
      with a warning);
    * one ``.csv`` file -> a manifest (see :func:`_read_manifest`);
    * image files -> ONE case whose channels are the files in the order given.

    Raises:
        PipelineError: missing path, folder with no case, mixed kinds, duplicate case ids.
    """
    from ..brats_layout import discover_brats_case
    from ..errors import MedcamDataError

    paths = [Path(p) for p in inputs]
    if not paths:
        raise PipelineError(
            "no input given: pass a BraTS case folder, a folder of cases, a CSV manifest or image files"
        )
    for p in paths:
        if not p.exists():
            raise PipelineError(f"input '{p}' does not exist")
    cases: list[CaseSource]
    if len(paths) == 1 and paths[0].is_file() and paths[0].suffix.lower() == ".csv":
        cases = _read_manifest(paths[0])
    elif len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        try:
            _, cid, found = discover_brats_case(folder)
            cases = [CaseSource(_folder_case_id(folder, cid), CaseLayout.BRATS_FOLDER, folder, files=found)]
        except MedcamDataError as first_error:
            subs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
            cases = []
            for d in subs:
                try:
                    _, cid, found = discover_brats_case(d)
                except MedcamDataError as e:
                    logger.warning("ignoring folder %s: %s", d, str(e).splitlines()[0])
                    continue
                cid = _folder_case_id(d, d.name if cid in ("", None) else cid)
                cases.append(CaseSource(cid, CaseLayout.BRATS_FOLDER, d, files=found))
            if not cases:
                raise PipelineError(f"no BraTS case in '{folder}' nor in its sub-folders: {first_error}") from None
    else:
        if any(p.is_dir() for p in paths) and len(paths) > 1:
            raise PipelineError(
                "give either one folder (a case or a folder of cases), one CSV manifest, or image files"
            )
        if len(paths) == 1 and paths[0].suffix.lower() == ".csv":
            raise PipelineError(f"manifest '{paths[0]}' is not a file")
        cases = [CaseSource(id_from_files(paths), CaseLayout.VOLUMES, list(paths))]
    cases = _named(cases, case_id)
    ids = [c.case_id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise PipelineError(f"duplicate case ids {dup[:5]}: give each case a distinct case_id (manifest column)")
    return cases


#: a file of the channel-indexed layout (nnU-Net's input layout): ``CASE_XXXX<ending>``, XXXX the channel index
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _channel_split(name: str, endings: Sequence[str]) -> tuple[str, int] | None:
    """``(case, channel index)`` of a ``CASE_XXXX<ending>`` file name; None for any other name."""
    for e in sorted(endings, key=len, reverse=True):
        if name.endswith(e):
            m = _CHANNEL_FILE.match(name[: -len(e)])
            return (m.group("case"), int(m.group("channel"))) if m else None
    return None


def _channel_layout(folder: Path, n_channels: int, endings: Sequence[str]) -> list[CaseSource] | None:
    """The cases of a folder in the channel-indexed layout (``CASE_0000<ending>`` .. ``CASE_{C-1:04d}<ending>``,
    as ``nnUNetv2_predict`` reads ``imagesTs``), or None when the folder holds no such file."""
    groups: dict[str, dict[int, Path]] = {}
    for p in sorted(folder.iterdir()):
        split = _channel_split(p.name, endings) if p.is_file() else None
        if split is not None:
            groups.setdefault(split[0], {})[split[1]] = p
    cases = []
    for cid, by_channel in sorted(groups.items()):
        if sorted(by_channel) != list(range(n_channels)):
            raise PipelineError(
                f"case '{cid}' in '{folder}' has channel files {[f'{c:04d}' for c in sorted(by_channel)]}; the model "
                f"takes {n_channels} channels, as {cid}_0000{endings[0]} .. {cid}_{n_channels - 1:04d}{endings[0]}"
            )
        cases.append(CaseSource(_case_id(cid, folder), CaseLayout.VOLUMES, [by_channel[c] for c in range(n_channels)]))
    return cases or None


def discover_channel_cases(
    inputs: Sequence[PathLike], n_channels: int, endings: Sequence[str], case_id: str | None = None
) -> list[CaseSource]:
    """The cases of ``inputs`` for a model of ``n_channels`` input channels (any framework).

    * one folder in the channel-indexed layout (``CASE_XXXX<ending>`` files, one per channel, nnU-Net's) -> its
      cases, each with exactly the channels ``0000 .. C-1``;
    * image files -> ONE case, ordered by their channel index when all carry one of the same case, else as given;
    * anything else -> :func:`discover_cases` (BraTS case folders, cohorts, CSV manifests); image-file cases of a
      manifest must have ``n_channels`` files.

    Raises:
        PipelineError: what :func:`discover_cases` raises, a layout case missing a channel, a case with another
            number of image files than the model's channels.
    """
    paths = [Path(p) for p in inputs]
    cases = None
    if len(paths) == 1 and paths[0].is_dir():
        cases = _channel_layout(paths[0], n_channels, endings)
    cases = discover_cases(paths, case_id=case_id) if cases is None else _named(cases, case_id)
    for c in cases:
        if c.kind is CaseLayout.VOLUMES and len(c.source) != n_channels:
            raise PipelineError(
                f"case {c.case_id} has {len(c.source)} image file(s); the model takes {n_channels} input channels"
            )
    if all(p.is_file() and p.suffix.lower() != ".csv" for p in paths):  # image files: by their channel index
        splits = [_channel_split(p.name, endings) for p in paths]
        by_index = sorted((s[1], p) for s, p in zip(splits, paths) if s)
        if len(by_index) == len(paths) and len({s[0] for s in splits if s}) == 1:
            if [c for c, _ in by_index] == list(range(n_channels)):
                cid = case_id or _case_id(str(splits[0][0] if splits[0] else ""), paths[0])
                cases = [CaseSource(cid, CaseLayout.VOLUMES, [p for _, p in by_index])]
    return cases


def _named(cases: list[CaseSource], case_id: str | None) -> list[CaseSource]:
    """``cases`` with the ONE case named ``case_id`` (``--case-id``; checked), or as they are when it is None."""
    if case_id is None:
        return cases
    if len(cases) != 1:
        raise PipelineError(
            f"--case-id names ONE case, but the input holds {len(cases)} cases; name cohort cases with a CSV "
            "manifest's case_id column"
        )
    if _safe_id(case_id) != case_id or case_id in (".", ".."):
        raise PipelineError(f"--case-id {case_id!r}: use letters, digits, '.', '_' and '-' only")
    return [dataclasses.replace(cases[0], case_id=case_id)]


def load_case(source: CaseSource | PathLike, model: Any) -> Any:
    """Load one case on the model's grid (``model``: a :class:`~medcam.pipeline.LoadedModel`) with the model's own
    preprocessing (its adapter's
    :meth:`~medcam.frameworks.base.FrameworkAdapter.load_case`: medcam's preprocessing with the model's channel
    order, orientation, spacing, ...; a bundle's own preprocessing; nnU-Net's preprocessor).

    Returns:
        a :class:`~medcam.frameworks.base.ModelCase` (``image`` ``[C, X, Y, Z]``, ``invert``, ``paths``, ...).
    """
    if not isinstance(source, CaseSource):
        found = model.adapter.discover([source])
        if len(found) != 1:
            raise PipelineError(f"'{source}' holds {len(found)} cases; load them one at a time")
        source = found[0]
    return model.adapter.load_case(source)


def split_parts(cases: Sequence[CaseSource], num_parts: int = 1, part_id: int = 0) -> list[CaseSource]:
    """The cases of part ``part_id`` out of ``num_parts`` (cases sorted by id, then every ``num_parts``-th)."""
    if num_parts < 1:
        raise PipelineError(f"--num-parts must be >= 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise PipelineError(f"--part-id must be in 0..{num_parts - 1}, got {part_id}")
    ordered = sorted(cases, key=lambda c: c.case_id)
    return ordered[part_id::num_parts]
