"""DICOMweb in and out (``dicomweb-client``): fetch a study's series as a case's channels, store its DICOM outputs.

``dicomweb:http://HOST/dicom-web/studies/<StudyUID>[/series/<SeriesUID>]`` names the input. The series of the study
become the channels: matched to the BraTS modalities (t1, t1ce, t2, flair and their aliases) by the words of their
SeriesDescription, or given explicitly (``name=SeriesUID``); ``/series/<UID>`` is one series as one channel. QIDO-RS
finds the instances, WADO-RS fetches the missing ones into a local cache folder (one folder per series, files named
by SOPInstanceUID and never rewritten, so a re-run finds the same input files and the case is resumed), and a CSV
manifest of the series folders is the case handed to ``medcam explain``.

STOW-RS sends a case's DICOM outputs back (:func:`store_case`): every object is read back and checked first, the
instances the server already holds (QIDO by series) are left out, so re-running stores no duplicates.

Errors of the server (down, 4xx, 5xx, timeout) become :class:`DicomwebError` with what to do.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MedcamError
from .atomic import atomic_write

logger = logging.getLogger(__name__)

PREFIX = "dicomweb:"
_URL = re.compile(r"^(?P<root>https?://.+?)/studies/(?P<study>[0-9.]+)(?:/series/(?P<series>[0-9.]+))?/?$")
_BRATS = ("t1", "t1ce", "t2", "flair")
#: words of a SeriesDescription that make a T1 series the contrast-enhanced one
_CONTRAST = {"post", "gd", "gad", "contrast", "ce", "c"}


class DicomwebError(MedcamError):
    """A DICOMweb server could not be used (down, refused, timed out, answered with an error), or the study does not
    hold the series a case needs."""


@dataclass(frozen=True)
class DicomwebSource:
    """A parsed ``dicomweb:`` input: the service root URL, the study, optionally one series."""

    root: str
    study: str
    series: str | None = None


@dataclass(frozen=True)
class Auth:
    """How to authenticate: a bearer token, or HTTP basic auth (user, password); timeout in seconds."""

    token: str | None = None
    user: str | None = None
    password: str | None = None
    timeout: float = 30.0


def is_dicomweb(text: str) -> bool:
    """True for a ``dicomweb:`` input."""
    return str(text).startswith(PREFIX)


def parse_source(text: str) -> DicomwebSource:
    """Parse ``dicomweb:http://HOST/dicom-web/studies/<StudyUID>[/series/<SeriesUID>]``.

    Raises:
        DicomwebError: not of that form.
    """
    m = _URL.match(str(text)[len(PREFIX) :]) if is_dicomweb(text) else None
    if m is None:
        raise DicomwebError(
            f"{text!r} is not a DICOMweb input; write dicomweb:http://HOST/dicom-web/studies/<StudyUID> "
            "(optionally /series/<SeriesUID>)"
        )
    return DicomwebSource(m["root"], m["study"], m["series"])


def make_client(root: str, auth: Auth) -> Any:
    """A ``DICOMwebClient`` for ``root`` with the authentication and timeout of ``auth``; no retries on 5xx
    (errors are reported at once)."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if auth.user is not None:
        session.auth = (auth.user, auth.password or "")
    headers = {"Authorization": f"Bearer {auth.token}"} if auth.token else None
    client = DICOMwebClient(url=root, session=session, headers=headers, timeout=auth.timeout)
    client.set_http_retry_params(retry=False)
    return client


@contextlib.contextmanager
def server_errors(root: str, what: str) -> Iterator[None]:
    """Turn ``requests`` failures while doing ``what`` into one :class:`DicomwebError` naming the fix."""
    import requests

    try:
        yield
    except requests.exceptions.Timeout as e:
        raise DicomwebError(f"{what}: the DICOMweb server {root} did not answer in time ({e}); retry later") from e
    except requests.exceptions.ConnectionError as e:
        raise DicomwebError(
            f"{what}: cannot reach the DICOMweb server {root} (is it running, is the URL right?): {type(e).__name__}"
        ) from e
    except requests.exceptions.HTTPError as e:
        code = e.response.status_code if e.response is not None else 0
        hint = {
            401: "authentication failed: pass --dicomweb-token or --dicomweb-user/--dicomweb-password",
            403: "access refused for these credentials",
            404: "not found: check the study/series UID and the DICOMweb root URL",
        }.get(code, "the server failed; see its log" if code >= 500 else "the server refused the request")
        raise DicomwebError(f"{what}: HTTP {code} from {root}: {hint}") from e


def _tag(record: Mapping[str, Any], tag: str) -> str:
    values = record.get(tag, {}).get("Value") or [""]
    return str(values[0])


def match_channels(series: Sequence[Mapping[str, Any]], explicit: Mapping[str, str] | None = None) -> dict[str, str]:
    """Channel name -> SeriesInstanceUID: ``explicit`` when given, else the BraTS modality named by words of each
    series' SeriesDescription (aliases as in :data:`medcam.data.brats.MODALITY_ALIASES`; FLAIR wins over T2 in
    "T2-FLAIR"; T1 with post/Gd/contrast/ce is T1ce). Series naming no modality (localisers...) are ignored.

    Raises:
        DicomwebError: a modality matched by no series or by several, listing the study's series.
    """
    from ..data.brats import MODALITY_ALIASES

    if explicit:
        return dict(explicit)
    found: dict[str, list[str]] = {}
    for rec in series:
        words = set(re.split(r"[^a-z0-9]+", _tag(rec, "0008103E").lower()))
        mods = {MODALITY_ALIASES[w] for w in words if w in MODALITY_ALIASES and MODALITY_ALIASES[w] in _BRATS}
        if "flair" in mods:  # "T2-FLAIR", "T2 FLAIR": FLAIR is the T2-weighted inversion recovery
            mods.discard("t2")
        if mods == {"t1"} and words & _CONTRAST:  # "T1 post Gd", "T1 contrast"
            mods = {"t1ce"}
        if "t1ce" in mods:
            mods.discard("t1")
        if len(mods) == 1:
            found.setdefault(mods.pop(), []).append(_tag(rec, "0020000E"))
    listing = "; ".join(f"{_tag(r, '0020000E')} {_tag(r, '0008103E')!r}" for r in series)
    bad = [m for m in _BRATS if len(found.get(m, [])) != 1]
    if bad:
        raise DicomwebError(
            f"cannot match the study's series to the channels {', '.join(_BRATS)} by SeriesDescription "
            f"({', '.join(bad)}: {'none' if not any(found.get(m) for m in bad) else 'ambiguous'}); series: {listing}. "
            "Give them explicitly: --dicomweb-series t1=UID --dicomweb-series t1ce=UID ..."
        )
    return {m: found[m][0] for m in _BRATS}


def fetch_series(client: Any, src: DicomwebSource, series_uid: str, folder: Path, progress: bool) -> int:
    """Fetch the instances of one series that ``folder`` lacks (files ``<SOPInstanceUID>.dcm``, written atomically);
    returns how many were fetched."""
    from tqdm.auto import tqdm

    with server_errors(src.root, f"listing series {series_uid}"):
        instances = client.search_for_instances(src.study, series_uid, fields=["00080018"])
    missing = [u for u in (_tag(r, "00080018") for r in instances) if not (folder / f"{u}.dcm").exists()]
    if not instances:
        raise DicomwebError(f"series {series_uid} of study {src.study} has no instances on {src.root}")
    if len(missing) == len(instances):  # nothing cached: the whole series in one WADO-RS request
        with server_errors(src.root, f"fetching series {series_uid}"):
            datasets = client.retrieve_series(src.study, series_uid)
        for ds in datasets:
            _save(ds, folder)
        return len(datasets)
    for sop in tqdm(missing, desc=f"fetch {series_uid[-12:]}", unit="img", disable=not progress or not missing):
        with server_errors(src.root, f"fetching instance {sop}"):
            _save(client.retrieve_instance(src.study, series_uid, sop), folder)
    return len(missing)


def _save(ds: Any, folder: Path) -> None:
    with atomic_write(folder / f"{ds.SOPInstanceUID}.dcm") as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def fetch_case(
    src: DicomwebSource, cache: Path, auth: Auth, *, explicit: Mapping[str, str] | None = None, progress: bool = True
) -> Path:
    """Fetch the series of a ``dicomweb:`` input into ``cache/<StudyUID>/`` and return the case's CSV manifest
    (columns = channel names, values = series folders; ``case_id`` = the StudyInstanceUID).

    Raises:
        DicomwebError: server errors, no series, channels that cannot be matched.
    """
    client = make_client(src.root, auth)
    if src.series is not None:
        channels = {"image": src.series}
    else:
        with server_errors(src.root, f"listing the series of study {src.study}"):
            series = client.search_for_series(src.study)
        if not series:
            raise DicomwebError(f"study {src.study} has no series on {src.root}")
        channels = match_channels(series, explicit)
    root = Path(cache) / src.study
    from tqdm.auto import tqdm

    bar = tqdm(list(channels.values()), desc="fetch series", unit="series", disable=not progress)
    fetched = sum(fetch_series(client, src, uid, root / uid, progress) for uid in bar)
    logger.info("fetched %d instance(s) of study %s into %s", fetched, src.study, root)
    manifest = root / "manifest.csv"
    rows = [["case_id", *channels], [src.study, *(uid for uid in channels.values())]]
    text = "\n".join(",".join(r) for r in rows) + "\n"
    if not manifest.exists() or manifest.read_text() != text:
        with atomic_write(manifest, overwrite=True) as tmp:
            with open(tmp, "w", newline="") as f:
                csv.writer(f, lineterminator="\n").writerows(rows)
    return manifest


def _read_outputs(case_dir: Path) -> list[Any]:
    """The case's DICOM outputs (``summary.json``'s ``dicom`` record), read back and checked against the record.

    Raises:
        DicomwebError: no DICOM outputs, or a file missing/unreadable/not the recorded object.
    """
    import json

    import pydicom

    rec = json.loads((case_dir / "summary.json").read_text()).get("dicom")
    if not rec:
        raise DicomwebError(f"case folder '{case_dir}' has no DICOM outputs to store (explain it with --dicom-out on)")
    out = []
    for o in rec["objects"]:
        path = case_dir / rec.get("folder", "dicom") / o["path"]
        try:
            ds = pydicom.dcmread(path)
        except Exception as e:  # noqa: BLE001 - any failure: nothing is stored
            raise DicomwebError(
                f"DICOM output '{path}' cannot be read ({type(e).__name__}: {e}); nothing stored"
            ) from e
        if str(ds.SOPInstanceUID) != o["sop"] or str(ds.SeriesInstanceUID) != o["series"]:
            raise DicomwebError(f"DICOM output '{path}' is not the object summary.json records; nothing stored")
        out.append(ds)
    return out


def _present(client: Any, root: str, study: str, series: str) -> set[str]:
    """SOPInstanceUIDs of ``series`` the server already holds (none when it does not know the series)."""
    import requests

    try:
        with server_errors(root, f"looking up series {series}"):
            found = client.search_for_instances(study, series, fields=["00080018"])
    except DicomwebError as e:
        cause = e.__cause__
        if isinstance(cause, requests.exceptions.HTTPError) and cause.response is not None:
            if cause.response.status_code == 404:
                return set()
        raise
    return {_tag(r, "00080018") for r in found}


def store_case(case_dir: Path, root: str, auth: Auth, *, batch: int = 16, progress: bool = True) -> dict[str, Any]:
    """STOW-RS the DICOM outputs of one case folder to ``root``, leaving out what the server already holds.

    Every object is read back and checked, and the server asked what it holds, before the first object is sent.

    Returns:
        ``{"stored": n, "present": n already on the server, "series": [SeriesInstanceUID, ...]}``.

    Raises:
        DicomwebError: unreadable outputs (nothing stored), server errors, objects the server refused (the
            message says how many were stored before; a re-run sends only the rest).
    """
    from tqdm.auto import tqdm

    datasets = _read_outputs(Path(case_dir))
    client = make_client(root, auth)
    by_series: dict[tuple[str, str], list[Any]] = {}
    for ds in datasets:
        by_series.setdefault((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)), []).append(ds)
    todo, present = [], 0
    for (study, series), group in by_series.items():
        have = _present(client, root, study, series)
        present += sum(str(ds.SOPInstanceUID) in have for ds in group)
        todo += [ds for ds in group if str(ds.SOPInstanceUID) not in have]
    stored = 0
    with tqdm(total=len(todo), desc="store", unit="obj", disable=not progress or not todo) as bar:
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            with server_errors(root, f"storing (after {stored} of {len(todo)} objects were stored)"):
                answer = client.store_instances(chunk)
            failed = answer.get("FailedSOPSequence") if answer is not None else None
            if failed:
                raise DicomwebError(
                    f"the server refused {len(failed)} object(s) after {stored} were stored; see its log, then re-run"
                )
            stored += len(chunk)
            bar.update(len(chunk))
    logger.info("stored %d DICOM object(s) on %s (%d already there)", stored, root, present)
    return {"stored": stored, "present": present, "series": sorted({s for _, s in by_series})}
