"""Claims a new user found untrue (issue 29), each now true: ``--roi-size 0,0,0``, label files of plain case folders
(the shared real cases), per-case ``--reference mask:`` templates for a cohort, warnings for sanitised and
symlinked case ids, and ``make test`` running the notebooks after a failed unit test."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
from pathlib import Path

import click
import numpy as np
import pytest

from medcam.cli import _ints
from medcam.data.brats import discover_brats_case
from medcam.pipeline import discover_cases
from tests._cli_helpers import assert_one_line_error
from tests.test_evaluate_cli import FAST, one_thread, run, tiny_demo  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "brats_real_cases"
if not SHARED.is_dir():  # a worktree beside the main checkout
    SHARED = Path("/work/shared/data/brats_real_cases")


def _plain(folder: Path, src: Path | None = None, labels: tuple[str, ...] = ()) -> Path:
    """A case folder with files named after the modality (``t1.nii.gz`` ...) and the given label file names; copied
    from a BraTS 2021 phantom folder ``src`` (else empty files: discovery reads names only)."""
    folder.mkdir(parents=True)
    for m in ("t1", "t1ce", "t2", "flair"):
        dst = folder / f"{m}.nii.gz"
        shutil.copyfile(src / f"{src.name}_{m}.nii.gz", dst) if src else dst.write_bytes(b"")
    for name in labels:
        dst = folder / name
        shutil.copyfile(src / f"{src.name}_seg.nii.gz", dst) if src else dst.write_bytes(b"")
    return folder


# ------------------------------------------------------------------------------------------------ --roi-size 0,0,0
def test_roi_size_zero_in_either_form_is_the_whole_image():
    assert _ints("0", "--roi-size") == () and _ints("0,0,0", "--roi-size") == () and _ints("0x0x0", "x") == ()
    assert _ints("none", "--roi-size") == () and _ints("96", "--roi-size") == (96, 96, 96)
    for bad in ("0,96,96", "-1", "1,2"):
        with pytest.raises(click.BadParameter):
            _ints(bad, "--roi-size")


def test_roi_size_0_0_0_runs_evaluate_on_the_whole_image(tiny_demo, tmp_path):
    from medcam.data.phantoms import write_phantom_case

    case = write_phantom_case(tmp_path / "in", seed=0, spacing_mm=3.0)
    out = tmp_path / "eval"
    r = run([case, "-o", out, "-M", "hirescam", "-t", "WT", "--metrics", "deletion", "--no-plots",
             "--roi-size", "0,0,0", "--divisible-by", "16", *FAST])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (out / "metrics.csv").is_file()


@pytest.mark.parametrize("command", ["explain", "evaluate"])
def test_malformed_window_and_spacing_options_answer_before_torch_is_imported(command, tmp_path):
    from tests.test_trust_api import _python

    for option, value in (("--roi-size", "0,96,96"), ("--spacing", "x")):
        args = [command, str(tmp_path), "-o", str(tmp_path / "o"), option, value]
        p = _python(
            f"import sys\nfrom medcam.cli import main\ntry:\n    main({args!r})\nexcept SystemExit as e:\n"
            "    print('RC', e.code)\nprint('TORCH', 'torch' in sys.modules)\n"
        )
        assert "RC 2" in p.stdout and "TORCH False" in p.stdout, (p.stdout, p.stderr)
        assert option in p.stderr


# ------------------------------------------------------------------------------------- label files of plain folders
def test_plain_folder_takes_its_only_seg_prefixed_file_as_label(tmp_path):
    layout, cid, paths = discover_brats_case(_plain(tmp_path / "p1", labels=("seg_brats25_2.nii.gz",)))
    assert (layout, cid) == ("plain", "p1") and paths["seg"].name == "seg_brats25_2.nii.gz"
    # seg.nii.gz wins over seg_* files
    _, _, paths = discover_brats_case(_plain(tmp_path / "p2", labels=("seg.nii.gz", "seg_a.nii.gz", "seg_b.nii.gz")))
    assert paths["seg"].name == "seg.nii.gz"


def test_plain_folder_with_several_seg_files_uses_none_and_says_how_to_pick(tmp_path, caplog):
    folder = _plain(tmp_path / "p", labels=("seg_fused_simple.nii.gz", "seg_isen-20.nii.gz"))
    with caplog.at_level(logging.WARNING, logger="medcam"):
        _, _, paths = discover_brats_case(folder)
    assert "seg" not in paths
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "seg_fused_simple.nii.gz, seg_isen-20.nii.gz" in msg and "seg column" in msg
    assert "--reference mask:{folder}/NAME.nii.gz" in msg


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/brats_real_cases")
def test_the_shared_real_cases_find_their_labels_or_say_why(caplog):
    with caplog.at_level(logging.WARNING, logger="medcam"):
        cases = discover_cases([SHARED])
    assert [c.case_id for c in cases] == ["brats_glioma_case_brainlesion", "tcga_du_7294", "tcga_fg_6692"]
    assert discover_brats_case(SHARED / "brats_glioma_case_brainlesion")[2]["seg"].name == "seg_brats25_2.nii.gz"
    assert "seg" not in discover_brats_case(SHARED / "tcga_du_7294")[2]
    assert "seg_fused_simple.nii.gz" in caplog.text


# --------------------------------------------------------------------------------- per-case --reference templates
def test_evaluate_cohort_with_a_per_case_reference_template(tiny_demo, tmp_path):
    """Two plain case folders each holding two ``seg_*`` files (like the shared TCGA cases): no label is picked,
    ``--metrics localisation`` with ``--reference mask:{folder}/seg_fused.nii.gz`` scores every case against its own
    file; the plain ``mask:FILE`` hint would have given every case one mask."""
    from medcam.data.phantoms import write_phantom_case

    cohort = tmp_path / "cohort"
    for seed, name in ((0, "a"), (1, "b")):
        src = write_phantom_case(tmp_path / "src", seed=seed, spacing_mm=3.0)
        _plain(cohort / name, src, labels=("seg_fused.nii.gz", "seg_other.nii.gz"))
    out = tmp_path / "eval"
    args = [cohort, "-o", out, "-M", "hirescam", "-t", "WT", "--metrics", "localisation", "--no-plots", *FAST]
    r = run(args)  # no label: localisation asked for by name fails every case, with the template as the hint
    assert r.exit_code == 1 and "mask:{folder}/NAME.nii.gz" in r.output + r.stderr
    r = run([*args, "--reference", "mask:{folder}/seg_fused.nii.gz"])
    assert r.exit_code == 0, r.output + r.stderr
    with open(out / "metrics.csv", newline="") as fh:
        rows = [x for x in csv.DictReader(fh) if x["metric"] == "energy_pointing_game"]
    assert sorted(x["case"] for x in rows) == ["a", "b"]
    values = [float(x["value"]) for x in rows]
    assert all(0 <= v <= 1 for v in values) and values[0] != values[1]  # each case its own reference
    r = run([*args, "--reference", "mask:{nope}/seg.nii.gz", "--overwrite"])  # per case, naming the placeholders
    assert r.exit_code == 1 and "case a has no field 'nope'; placeholders are {case}, {folder}" in r.stderr
    assert_one_line_error(run([*args, "--reference", "mask:{a b}/seg.nii.gz", "--overwrite"]), "--reference")


# ------------------------------------------------------------------------------------- case ids: warnings, not silence
def test_sanitised_and_symlinked_case_ids_are_logged(tmp_path, caplog):
    real = _plain(tmp_path / "data" / "patient_007")
    link = tmp_path / "cohort" / "nice name"
    link.parent.mkdir()
    os.symlink(real, link, target_is_directory=True)
    spaced = _plain(tmp_path / "cohort" / "case 12")
    with caplog.at_level(logging.WARNING, logger="medcam"):
        cases = discover_cases([tmp_path / "cohort"])
    assert sorted(c.case_id for c in cases) == ["case_12", "patient_007"]
    text = caplog.text
    assert "symbolic link" in text and "'patient_007', not 'nice name'" in text
    assert "'case 12'" in text and "'case_12'" in text and str(spaced) in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medcam"):
        assert [c.case_id for c in discover_cases([real])] == ["patient_007"]
    assert not caplog.records  # a plain, well-named folder: no warning


# ------------------------------------------------------------------------------------------------------ make test
def test_make_test_runs_the_notebooks_when_a_unit_test_fails(tmp_path):
    """``make test`` with a Python whose unit-test run fails: the notebook run still happens, and make fails."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    venv.mkdir()
    log = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\ncase "$*" in *nbmake*) exit 0;; *) exit 1;; esac\n')
    fake.chmod(0o755)
    (venv / ".installed").touch()  # newer than pyproject.toml: the venv target has nothing to do
    r = subprocess.run(
        ["make", "-C", str(ROOT), "test", f"VENV={venv}", f"PY={fake}"], capture_output=True, text=True, timeout=60
    )
    calls = log.read_text().splitlines()
    assert r.returncode != 0
    assert len(calls) == 2 and calls[0].endswith(" tests") and "--nbmake notebooks" in calls[1]
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\ncase "$*" in *nbmake*) exit 1;; *) exit 0;; esac\n')
    r = subprocess.run(["make", "-C", str(ROOT), "test", f"VENV={venv}", f"PY={fake}"], capture_output=True, timeout=60)
    assert r.returncode != 0 and len(log.read_text().splitlines()) == 4
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 0\n')
    r = subprocess.run(["make", "-C", str(ROOT), "test", f"VENV={venv}", f"PY={fake}"], capture_output=True, timeout=60)
    assert r.returncode == 0 and np.size(log.read_text().splitlines()) == 6
