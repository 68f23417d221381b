"""Issue 30: cohorts that survive tampered outputs, two runs into one folder, killed runs, full disks, corrupt
summaries; the folder's record of every case. Fast fakes (tests/pipeline/_fakes.MapWork), real files and processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medcam.pipeline import PipelineError
from medcam.pipeline.cohort import run_cohort
from medcam.pipeline.locks import FileLock, lock_path
from medcam.pipeline.space import DiskFullError
from tests.pipeline._fakes import MapWork, make_cases

REPO = Path(__file__).resolve().parents[2]


def _run(cases, out, **kw):
    kw.setdefault("settings", {"s": 1})
    return run_cohort(cases, kw.pop("work", MapWork()), out, progress=False, **kw)


def _status(run):
    return {r["case_id"]: r["status"] for r in run["cases"]}


# ------------------------------------------------------------------------------------------------ item 1
@pytest.mark.parametrize("damage", ["delete", "truncate", "zero", "summary"])
def test_resume_redoes_a_case_whose_outputs_were_tampered_with(tmp_path, damage):
    cases = make_cases(tmp_path, 2)
    out = tmp_path / "o"
    _run(cases, out)
    good = np.load(out / "c0" / "map.npy")
    target = out / "c0" / ("summary.json" if damage == "summary" else "map.npy")
    if damage == "delete":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "zero":
        target.write_bytes(bytes(target.stat().st_size))  # same size, other content
    else:
        target.write_text('{"medcam_version": "0.1", "status": "ok", "cas')  # cut off while copied
    run = _run(cases, out)
    assert _status(run) == {"c0": "ok", "c1": "skipped"}
    rec = run["cases"][0]
    want = {"delete": "is missing", "truncate": "bytes", "zero": "checksum", "summary": "summary.json is damaged"}
    assert want[damage] in rec["redone"]
    np.testing.assert_array_equal(np.load(out / "c0" / "map.npy"), good)
    assert _status(_run(cases, out)) == {"c0": "skipped", "c1": "skipped"}


# ------------------------------------------------------------------------------------------------ item 2
def test_a_case_locked_by_a_live_run_is_skipped_and_a_stale_lock_taken_over(tmp_path, monkeypatch):
    cases = make_cases(tmp_path, 2)
    out = tmp_path / "o"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live process of this host holds c0's lock
        lock_path(out, "c0").write_text(json.dumps({"host": os.uname().nodename, "pid": other.pid, "token": "x"}))
        from medcam.pipeline import locks

        monkeypatch.setattr(locks, "host_name", lambda: os.uname().nodename)
        run = _run(cases, out)
        assert _status(run) == {"c0": "skipped", "c1": "ok"}
        assert f"process {other.pid}" in run["cases"][0]["elsewhere"] and not (out / "c0").exists()
    finally:
        other.kill()
        other.wait()
    # the holder died: its lock is stale and taken over
    assert _status(_run(cases, out)) == {"c0": "ok", "c1": "skipped"}
    assert not lock_path(out, "c0").exists()
    # a lock of another host without heartbeat for longer than the stale time is taken over too
    lock_path(out, "c1").write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "y"}))
    old = time.time() - 3600
    os.utime(lock_path(out, "c1"), (old, old))
    lk = FileLock(lock_path(out, "c1"))
    assert lk.acquire() and json.loads(lock_path(out, "c1").read_text())["pid"] == os.getpid()
    lk.release()
    # a live one of another host (fresh heartbeat) is not
    lock_path(out, "c1").write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "y"}))
    lk = FileLock(lock_path(out, "c1"))
    assert not lk.acquire() and lk.holder["host"] == "elsewhere"


RACE = """
import sys, time
from pathlib import Path
from medcam.pipeline.cohort import run_cohort
from tests.pipeline._fakes import MapWork, make_cases
root = Path(sys.argv[1])
cases = make_cases(root, 4)
while time.time() < float(sys.argv[2]):
    time.sleep(0.005)
run_cohort(cases, MapWork(calls_file=sys.argv[3], nbytes=1 << 20), root / "o", settings={"s": 1}, progress=False)
"""


def test_two_runs_into_one_folder_do_every_case_once_and_both_summaries_are_right(tmp_path):
    make_cases(tmp_path, 4)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    start = time.time() + 8  # both start together, after their imports
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(tmp_path), str(start), str(tmp_path / f"calls{i}")],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    calls = [
        c for i in range(2) if (tmp_path / f"calls{i}").exists() for c in (tmp_path / f"calls{i}").read_text().split()
    ]
    assert sorted(calls) == ["c0", "c1", "c2", "c3"]  # every case computed exactly once
    folder = json.loads((tmp_path / "o" / "cohort_summary.json").read_text())
    assert {c["case_id"]: c["status"] for c in folder["cases"]} == {f"c{i}": "ok" for i in range(4)}
    assert folder["ok"] == 4 and folder["failed"] == 0
    assert not [p.name for p in (tmp_path / "o").iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------ item 3
KILLED = """
import os, sys
from pathlib import Path
import medcam.io.atomic as atomic
from medcam.pipeline.cohort import run_cohort
from tests.pipeline._fakes import MapWork, make_cases
root = Path(sys.argv[1])
real = atomic.os.replace
def die(src, dst):
    if str(dst).endswith(sys.argv[2]):
        os.kill(os.getpid(), 9)  # SIGKILL while the file is written, its temporary file complete
    real(src, dst)
atomic.os.replace = die
run_cohort(make_cases(root, 2), MapWork(), root / "o", settings={"s": 1}, progress=False)
"""


@pytest.mark.parametrize("victim", ["cohort_summary.json", "summary.json"])
def test_what_a_killed_run_leaves_is_removed_by_the_next(tmp_path, victim):
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path), victim], env=env, cwd=REPO, timeout=240)
    assert p.returncode == -signal.SIGKILL
    out = tmp_path / "o"
    left = sorted(p.name for p in out.rglob(".*"))
    assert any(n.startswith((".tmp-", ".partial-")) for n in left), left
    # another host's staging folder whose case lock nobody holds (a run killed on another node)
    (out / ".partial-4242@othernode-0123abcd-c1").mkdir()
    run = _run(make_cases(tmp_path, 2), out)
    assert run["failed"] == 0
    assert not [p.name for p in out.rglob(".*")]


def test_a_live_runs_staging_folder_of_another_host_is_kept(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    keep = out / ".partial-4242@othernode-0123abcd-c1"
    keep.mkdir()
    lock_path(out, "c1").write_text(json.dumps({"host": "othernode", "pid": 4242, "token": "t"}))  # fresh heartbeat
    run = _run(make_cases(tmp_path, 2), out)
    assert _status(run) == {"c0": "ok", "c1": "skipped"} and keep.is_dir()


# ------------------------------------------------------------------------------------------------ item 4
@pytest.fixture
def small_fs(tmp_path):
    """A 3 MiB tmpfs (root only); skipped where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_stops_the_cohort_at_the_first_case_names_the_path_and_writes_the_summary(tmp_path, small_fs):
    cases = make_cases(tmp_path, 4, size=16)
    calls = tmp_path / "calls"
    run = _run(cases, small_fs / "o", work=MapWork(nbytes=1600 * 1024, calls_file=str(calls)))
    st = _status(run)
    assert st["c0"] == "ok" and st["c1"] == "failed" and st["c2"] == st["c3"] == "failed"
    assert calls.read_text().split() == ["c0", "c1"]  # c2, c3 not attempted
    assert "DiskFullError: no space left on the file system of" in run["cases"][1]["error"]
    assert str(small_fs / "o") in run["cases"][1]["error"]
    assert run["cases"][2]["error"].startswith("not attempted: no space left")
    folder = json.loads((small_fs / "o" / "cohort_summary.json").read_text())
    assert (folder["ok"], folder["failed"]) == (1, 3)
    assert not [p.name for p in (small_fs / "o").iterdir() if p.name.startswith(".")]
    # the next run checks the free space against a finished case's size before starting
    with pytest.raises(DiskFullError, match=r"MiB free on the file system of .* needs about 1\.6 MiB"):
        _run(cases, small_fs / "o", work=MapWork(nbytes=1600 * 1024, calls_file=str(calls)))
    assert calls.read_text().split() == ["c0", "c1"]


# ------------------------------------------------------------------------------------------------ item 5
def test_one_rule_for_folders_medcam_did_not_write(tmp_path):
    cases = make_cases(tmp_path, 3)
    out = tmp_path / "o"
    (out / "c1").mkdir(parents=True)
    (out / "c1" / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        run = _run(cases, out, overwrite=overwrite)
        assert _status(run) == {"c0": "ok", "c1": "failed", "c2": "ok"}  # the others are not blocked
        err = run["cases"][1]["error"]
        assert "was not written by medcam" in err and "with or without --overwrite: move it away" in err
        assert (out / "c1" / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------ item 8
def test_the_folder_record_keeps_every_case_across_runs_and_parts(tmp_path):
    cases = make_cases(tmp_path, 3)
    out = tmp_path / "o"
    run = _run(cases, out, work=MapWork(fail=("c1",)))
    assert _status(run) == {"c0": "ok", "c1": "failed", "c2": "ok"}
    run = _run(cases[1:2], out, work=MapWork(fail=("c1",)))  # one bad case run into the folder again
    folder = json.loads((out / "cohort_summary.json").read_text())
    assert [(c["case_id"], c["status"]) for c in folder["cases"]] == [("c0", "ok"), ("c1", "failed"), ("c2", "ok")]
    _run(cases, out)  # resume: c1 done now, the others found done
    folder = json.loads((out / "cohort_summary.json").read_text())
    assert [(c["case_id"], c["status"]) for c in folder["cases"]] == [("c0", "ok"), ("c1", "ok"), ("c2", "ok")]
    assert folder["last_run"]["skipped"] == 2 and folder["cases"][0]["checked"]
    assert folder["cases"][0]["numerics"]["torch_threads"] == 1 and folder["numerics_mixed"] is None
    # two parts into one folder: one record of all cases
    out2 = tmp_path / "p"
    for part in (1, 0):
        _run(cases, out2, num_parts=2, part_id=part)
    folder = json.loads((out2 / "cohort_summary.json").read_text())
    assert [c["case_id"] for c in folder["cases"]] == ["c0", "c1", "c2"] and folder["ok"] == 3
    assert {c["run"]["part"] for c in folder["cases"]} == {"0 of 2", "1 of 2"}


def test_other_settings_are_named(tmp_path):
    cases = make_cases(tmp_path, 1)
    _run(cases, tmp_path / "o")
    with pytest.raises(PipelineError, match=r"other settings \(s: 1 -> 2\)"):
        _run(cases, tmp_path / "o", settings={"s": 2})
