"""BraTS case folders found by their file names alone (no image is read; no torch, MONAI or nibabel import), so that
the command line reports a missing modality before the heavy imports. :mod:`medcam.data.brats` re-exports these
names and loads the cases.

Layouts: BraTS 2017-2021 (``<ID>_t1.nii.gz``, ``_t1ce``, ``_t2``, ``_flair``, optional ``_seg``), BraTS 2023+
(``<ID>-t1n.nii.gz``, ``-t1c``, ``-t2w``, ``-t2f``, optional ``-seg``) and files named after the modality alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from .errors import MedcamDataError
from .types import PathLike

__all__ = [
    "MODALITIES", "REGIONS", "LAYOUT_SUFFIXES", "LABEL_CONVENTIONS", "MODALITY_ALIASES", "discover_brats_case",
    "strip_image_suffix",
]  # fmt: skip

#: the messages of :mod:`medcam.data.brats`, whose functions these were
logger = logging.getLogger("medcam.data.brats")


#: canonical modality names, in the default channel order
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
#: region channel names produced by :func:`labels_to_regions`
REGIONS: tuple[str, ...] = ("TC", "WT", "ET")
#: file-name suffix per canonical modality for each layout (``<ID>_t1.nii.gz`` / ``<ID>-t1n.nii.gz``)
LAYOUT_SUFFIXES: dict[str, dict[str, str]] = {
    "brats2021": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"},
    "brats2023": {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"},
}
#: label values per convention: name -> value
LABEL_CONVENTIONS: dict[str, dict[str, int]] = {
    "brats2021": {"NCR": 1, "ED": 2, "ET": 4},
    "brats2023": {"NETC": 1, "SNFH": 2, "ET": 3},
}
#: accepted aliases in explicit mappings -> canonical name
MODALITY_ALIASES: dict[str, str] = {
    "t1": "t1",
    "t1n": "t1",
    "t1w": "t1",
    "t1ce": "t1ce",
    "t1c": "t1ce",
    "t1gd": "t1ce",
    "t2": "t2",
    "t2w": "t2",
    "flair": "flair",
    "t2f": "flair",
    "seg": "seg",
    "label": "seg",
}
_EXTS = (".nii.gz", ".nii")


def _match(folder: Path, suffix: str):
    hits = []
    for ext in _EXTS:
        hits += sorted(p for p in folder.glob(f"*{suffix}{ext}") if p.is_file() or p.is_symlink())
    return hits


#: label files of a plain folder besides ``seg``/``label``: names starting with one of these (``seg_fused.nii.gz``)
_LABEL_PREFIXES = ("seg_", "seg-", "label_", "label-")


def _plain_files(folder: Path) -> dict[str, list[Path]]:
    """Files named after the modality alone (``t1.nii.gz``, ``t1ce.nii.gz``/``t1c``, ``t2``/``t2w``, ``flair``/``t2f``,
    optional ``seg``/``label``), case-insensitive: canonical modality -> matching files. Files named ``seg_*`` /
    ``label_*`` (``-`` too) are listed under ``"seg_candidates"``."""
    hits: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        name = p.name.lower()
        ext = next((e for e in _EXTS if name.endswith(e)), None)
        if ext is None or not (p.is_file() or p.is_symlink()):
            continue
        canon = MODALITY_ALIASES.get(name[: -len(ext)])
        if canon is None and name.startswith(_LABEL_PREFIXES):
            canon = "seg_candidates"
        if canon is not None:
            hits.setdefault(canon, []).append(p)
    return hits


def _plain_label(folder: Path, hits: dict[str, list[Path]]) -> list[Path]:
    """The label file of a plain folder: ``seg``/``label`` (``.nii.gz``), else the only ``seg_*``/``label_*`` file;
    several such files and no ``seg.nii.gz``: none (a warning names them and how to pick one)."""
    if hits.get("seg") or len(hits.get("seg_candidates", [])) < 2:
        return hits.get("seg") or hits.get("seg_candidates", [])
    names = ", ".join(p.name for p in hits["seg_candidates"])
    logger.warning(
        "case folder %s has several label files (%s) and none named seg.nii.gz: no label is used. Pick one with a CSV "
        "manifest's seg column (case_id,t1,t1ce,t2,flair,seg), or give the metrics a reference with "
        "--reference mask:{folder}/NAME.nii.gz",
        folder,
        names,
    )
    return []


def _discover_plain(folder: Path, hits: dict[str, list[Path]]) -> tuple[str, str, dict[str, Path]]:
    paths: dict[str, Path] = {}
    hits = {**hits, "seg": _plain_label(folder, hits)}
    for m in MODALITIES + ("seg",):
        files = hits.get(m, [])
        if len(files) > 1:
            raise MedcamDataError(
                f"Folder '{folder}' has several {m.upper()} images ({', '.join(p.name for p in files)}); keep one."
            )
        if files:
            paths[m] = files[0]
        elif m != "seg":
            raise MedcamDataError(
                f"Case folder '{folder}' (files named after the modality) has no {m.upper()} image: expected "
                f"'{folder / (m + '.nii.gz')}' (names accepted: "
                f"{', '.join(a for a, c in MODALITY_ALIASES.items() if c == m)})."
            )
    case_id = folder.resolve().name
    logger.info("found case %s (plain file names) in %s", case_id, folder)
    return "plain", case_id, paths


def discover_brats_case(folder: PathLike) -> tuple[str, str, dict[str, Path]]:
    """Find the modality files of a BraTS case folder.

    Detects the BraTS 2017-2021 layout (``<ID>_t1.nii.gz``, ``_t1ce``, ``_t2``, ``_flair``, optional ``_seg``), the
    2023+ layout (``<ID>-t1n.nii.gz``, ``-t1c``, ``-t2w``, ``-t2f``, optional ``-seg``), or files named after the
    modality alone (layout ``"plain"``: ``t1.nii.gz, t1ce.nii.gz, t2.nii.gz, flair.nii.gz``, 2023 names
    ``t1n, t1c, t2w, t2f`` too, optional ``seg.nii.gz``; the case id is then the folder's name). ``.nii`` is
    accepted too.

    Returns:
        (layout, case_id, {"t1": path, "t1ce": ..., "t2": ..., "flair": ..., ["seg": ...]}).

    Raises:
        MedcamDataError: folder missing, no layout recognised, both layouts present, or a modality missing
            (the message names the expected file).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MedcamDataError(f"BraTS case folder '{folder}' does not exist or is not a folder.")
    found = {}
    for layout, sufs in LAYOUT_SUFFIXES.items():
        hits = {m: _match(folder, s) for m, s in sufs.items()}
        if any(hits[m] for m in MODALITIES):
            found[layout] = hits
    if not found:
        plain = _plain_files(folder)
        if any(plain.get(m) for m in MODALITIES):
            return _discover_plain(folder, plain)
        raise MedcamDataError(
            f"No BraTS case found in '{folder}': expected files '<ID>_t1.nii.gz, <ID>_t1ce.nii.gz, <ID>_t2.nii.gz, "
            "<ID>_flair.nii.gz' (BraTS 2017-2021), '<ID>-t1n.nii.gz, <ID>-t1c.nii.gz, <ID>-t2w.nii.gz, "
            "<ID>-t2f.nii.gz' (BraTS 2023+) or 't1.nii.gz, t1ce.nii.gz, t2.nii.gz, flair.nii.gz'. Rename the files, "
            "or list them in a CSV manifest (header case_id,t1,t1ce,t2,flair[,seg]; `medcam explain --help`); in "
            "Python, pass a mapping {'t1': ..., 't1ce': ..., 't2': ..., 'flair': ..., 'seg': ...}."
        )
    if len(found) > 1:
        raise MedcamDataError(
            f"Folder '{folder}' mixes BraTS 2017-2021 ('_t1') and 2023+ ('-t1n') file names; keep one case layout "
            "per folder, or list the files in a CSV manifest (Python: pass an explicit mapping)."
        )
    layout, hits = next(iter(found.items()))
    sufs = LAYOUT_SUFFIXES[layout]
    first = next(hits[m][0] for m in MODALITIES if hits[m])
    ext = next(e for e in _EXTS if first.name.endswith(e))
    first_mod = next(m for m in MODALITIES if hits[m])
    case_id = first.name[: -len(sufs[first_mod] + ext)]
    paths: dict[str, Path] = {}
    for m in MODALITIES + ("seg",):
        cands = [
            p for p in hits[m] if p.name[: -len(sufs[m]) - len(ext if p.name.endswith(ext) else ".nii")] == case_id
        ]
        exact = [folder / f"{case_id}{sufs[m]}{e}" for e in _EXTS]
        exact = [p for p in exact if p.exists()]
        if exact:
            paths[m] = exact[0]
        elif cands:
            paths[m] = cands[0]
        elif m != "seg":
            raise MedcamDataError(
                f"BraTS {'2017-2021' if layout == 'brats2021' else '2023+'} case '{case_id}' in '{folder}' has no "
                f"{m.upper()} image: expected file '{folder / (case_id + sufs[m] + ext)}'."
            )
    logger.info("found %s case %s in %s", layout, case_id, folder)
    return layout, case_id, paths


def _normalise_mapping(mapping: Mapping[str, PathLike]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for key, p in mapping.items():
        canon = MODALITY_ALIASES.get(str(key).lower())
        if canon is None:
            raise MedcamDataError(f"Unknown modality name {key!r} in the mapping; use {sorted(set(MODALITY_ALIASES))}.")
        if canon in out:
            raise MedcamDataError(f"Modality {canon!r} given twice in the mapping (as {key!r}).")
        out[canon] = Path(p)
    return out


def strip_image_suffix(name: str) -> str:
    """File name without its image extension (``.nii.gz``, ``.nii``, ``.nrrd``, ``.seg.nrrd``, ``.mha`` ...)."""
    lower = name.lower()
    for suf in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if lower.endswith(suf):
            return name[: -len(suf)]
    return name
