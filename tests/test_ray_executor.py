"""Cohorts on Ray (medcam.pipeline.ray_executor): same results as the local loop, retries, interruption, failures.

One local Ray instance (``num_cpus=2``) serves the whole module: Ray start-up costs seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medcam.pipeline import LoadedModel, discover_cases, explain_cohort, parse_targets
from tests._ray_helpers import REGIONS, KillingNet, tiny_net

ray = pytest.importorskip("ray")
from medcam.pipeline.ray_executor import RayExecutor  # noqa: E402

LAYER = "net.down_layers.3"
PRE = {"orientation": "RAS", "spacing": (8.0,) * 3, "normalize": True, "crop_foreground": False, "divisible_by": 16}
KW = dict(png=False, slicer=False, progress=False, settings={"test": "ray"})


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance with 2 CPUs whose workers can import ``tests`` (repository root on PYTHONPATH)."""
    root = str(Path(__file__).resolve().parents[1])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([root] + ([old] if old else []))
    try:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from medcam.data.phantoms import write_phantom_case

    root = tmp_path_factory.mktemp("ray_cohort")
    for seed in (3, 4, 5, 6):
        write_phantom_case(root, seed=seed, spacing_mm=3.0)
    return root


def _model(control: Path, poison=(), delay_s=0.0) -> LoadedModel:
    control.mkdir(parents=True, exist_ok=True)
    net = KillingNet(tiny_net(), str(control), poison, delay_s).eval()
    return LoadedModel(net=net, kind="factory", spec="tests._ray_helpers:tiny_net", regions=REGIONS, preprocessing=PRE)


def _explain(cases, model, out, **kw):
    specs = parse_targets(["WT", "ET:class"], REGIONS)
    return explain_cohort(cases, model, ["hirescam", "gradcam"], specs, LAYER, None, out, **{**KW, **kw})


def _comparable(run: dict) -> dict:
    """The run summary without what differs between any two runs (timings, output path)."""
    out = {k: v for k, v in run.items() if k not in ("output", "path")}
    out["cases"] = [{k: v for k, v in c.items() if k != "seconds"} for c in run["cases"]]
    return out


def _case_without_timings(path: Path) -> dict:
    s = json.loads(path.read_text())
    s.pop("timings")
    return s


@pytest.fixture
def driver_threads():
    """The driver on 2 torch threads, Ray workers on 1 CPU each: the maps are byte-equal only because every case
    runs with the run's recorded thread count (``--threads``, default 1) wherever it runs (issue 30: maps used to
    depend on where a case ran)."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def test_ray_equals_local_run(ray_local, cohort, tmp_path, driver_threads):
    cases = discover_cases([cohort])
    model = _model(tmp_path / "control")
    local = _explain(cases, model, tmp_path / "local")
    ex = RayExecutor(workers=2)
    dist = _explain(cases, model, tmp_path / "ray", executor=ex)
    assert (dist["ok"], dist["failed"]) == (4, 0)
    assert _comparable(dist) == _comparable(local)
    on_disk = json.loads((tmp_path / "ray" / "cohort_summary.json").read_text())
    assert [c["case_id"] for c in on_disk["cases"]] == [c.case_id for c in cases]
    for c in cases:
        maps = sorted((tmp_path / "local" / c.case_id / "heatmaps").iterdir())
        assert len(maps) == 4
        for m in maps:
            assert (tmp_path / "ray" / c.case_id / "heatmaps" / m.name).read_bytes() == m.read_bytes(), m
        a = _case_without_timings(tmp_path / "local" / c.case_id / "summary.json")
        b = _case_without_timings(tmp_path / "ray" / c.case_id / "summary.json")
        assert a == b
    logs = list((tmp_path / "ray" / "logs").glob("worker-*.log"))
    assert len(logs) == 2 and any("case Phantom_" in p.read_text() for p in logs)
    # resume through Ray: everything is done, nothing is sent to a worker
    again = _explain(cases, model, tmp_path / "ray", executor=RayExecutor(workers=2))
    assert (again["ok"], again["skipped"]) == (0, 4)


def test_killed_worker_is_retried_and_a_case_that_kills_every_worker_fails(ray_local, cohort, tmp_path):
    from medcam.pipeline import load_case

    cases = discover_cases([cohort])
    control = tmp_path / "control"
    poison_case = cases[2]
    probe = _model(control)
    poison = float(load_case(poison_case, probe).image.double().sum())
    model = _model(control, poison=(poison,))
    (control / "kill-once").touch()  # the first forward anywhere kills its worker
    ex = RayExecutor(workers=2, max_retries=1)
    run = _explain(cases, model, tmp_path / "out", executor=ex)
    kills = (control / "killed.log").read_text().splitlines()
    assert len(kills) == 1 + 2  # the armed kill, then the poison case on its first try and its one retry
    assert not (control / "kill-once").exists()
    status = {c["case_id"]: c for c in run["cases"]}
    assert (run["ok"], run["failed"]) == (3, 1)
    bad = status[poison_case.case_id]
    assert bad["status"] == "failed" and bad["error"].startswith("WorkerDied: the worker process died 2 time(s)")
    assert ex.attempts[poison_case.case_id] == 2 and sum(ex.attempts.values()) == 3
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["cohort_summary.json", "logs"] + [c.case_id for c in cases if c is not poison_case]
    )  # no staging folder left, no folder for the failed case
    on_disk = json.loads((out / "cohort_summary.json").read_text())
    assert on_disk["failed"] == 1 and on_disk["cases"][2]["error"] == bad["error"]


def test_cli_ray_records_a_case_error_once_without_retry(ray_local, cohort, tmp_path):
    from click.testing import CliRunner

    from medcam.cli import main

    root = tmp_path / "cohort"
    shutil.copytree(cohort / "Phantom_00003", root / "Phantom_00003")
    broken = root / "Broken_00001"
    broken.mkdir(parents=True)
    for m in ("t1", "t1ce", "t2", "flair"):
        (broken / f"Broken_00001_{m}.nii.gz").write_bytes(b"not a nifti")
    args = [str(root), "-o", str(tmp_path / "out"), "--model", "tests._ray_helpers:tiny_net", "--regions", "TC,WT,ET"]
    args += ["--spacing", "8", "--roi-size", "0", "--divisible-by", "16", "--no-crop-foreground", "--layer"]
    args += ["down_layers.3", "--no-png", "--no-slicer", "--quiet", "--device", "cpu", "--ray", "--workers", "1"]
    r = CliRunner().invoke(main, ["explain", *args])
    assert r.exit_code == 1, r.output
    assert "1 case(s) explained, 0 skipped (already done), 1 failed" in r.stdout
    run = json.loads((tmp_path / "out" / "cohort_summary.json").read_text())
    assert [c["status"] for c in run["cases"]] == ["failed", "ok"]
    assert "Broken_00001_t1.nii.gz" in run["cases"][0]["error"]
    logs = "".join(p.read_text() for p in (tmp_path / "out" / "logs").glob("worker-*.log"))
    started = [ln for ln in logs.splitlines() if ln.endswith(": case Broken_00001")]
    assert len(started) == 1  # a case error is not a lost worker: not retried


def test_evaluate_on_ray_equals_local(ray_local, cohort, tmp_path, driver_threads):
    from medcam.pipeline import RunSettings
    from medcam.pipeline.evaluate import EvaluationOptions, evaluate_files

    settings = RunSettings(
        model_spec="tests._ray_helpers:tiny_net", regions=["TC", "WT", "ET"], methods=["gradcam"], targets=["WT"],
        preprocessing={"spacing": (8.0,) * 3, "crop_foreground": False}, roi_size=(24, 24, 24), device="cpu",
        progress=False,
    )  # fmt: skip
    options = EvaluationOptions(metrics=("localisation",), plots=False)
    local = evaluate_files([str(cohort)], settings, options, tmp_path / "local")
    dist = evaluate_files([str(cohort)], settings, options, tmp_path / "ray", executor=RayExecutor(workers=2))
    assert local["failed"] == dist["failed"] == [] and len(local["result"].rows) > 4 * 3
    assert dist["result"].rows == local["result"].rows
    assert (tmp_path / "ray" / "metrics.csv").read_bytes() == (tmp_path / "local" / "metrics.csv").read_bytes()


def test_interrupted_driver_leaves_complete_cases_and_rerun_does_the_rest(ray_local, cohort, tmp_path):
    """``medcam explain --ray ADDRESS`` in another process joins the running Ray instance and gets SIGINT (Ctrl-C)
    once its first case folder exists; a re-run then explains exactly the cases without a folder."""
    out = tmp_path / "out"
    address = ray.get_runtime_context().gcs_address
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    args = [str(cohort), "-o", str(out), "--model", "tests._ray_helpers:slow_tiny_net", "--regions", "TC,WT,ET"]
    args += ["--spacing", "8", "--roi-size", "0", "--divisible-by", "16", "--no-crop-foreground", "--layer"]
    args += ["net.down_layers.3", "--no-png", "--no-slicer", "--quiet", "--device", "cpu"]
    code = "import sys; from medcam.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", code, "explain", *args]
    proc = subprocess.Popen([*cmd, "--ray", address, "--workers", "2"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and any(p.is_dir() and p.name.startswith("Phantom") for p in out.iterdir()):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "interrupted" in err, err
    # (a killed worker's case lock may stay: its holder is dead, the next run takes it over)
    left = sorted(p.name for p in out.iterdir() if p.name != "logs" and not p.name.startswith(".lock-"))
    assert left and all(n.startswith("Phantom") for n in left), left  # no staging folder, no run summary
    assert all((out / n / "summary.json").is_file() for n in left)  # complete folders only
    # the same command again, here in this process and without Ray (resume is the driver's, for every executor)
    from click.testing import CliRunner

    from medcam.cli import main

    r = CliRunner().invoke(main, ["explain", *args])
    assert r.exit_code == 0, r.output
    run = json.loads((out / "cohort_summary.json").read_text())["last_run"]  # the folder's record keeps "ok"
    by_status = {s: sorted(c["case_id"] for c in run["cases"] if c["status"] == s) for s in ("ok", "skipped")}
    assert by_status["skipped"] == left
    assert by_status["ok"] == sorted(c.case_id for c in discover_cases([cohort]) if c.case_id not in left)


def test_a_worker_that_cannot_start_stops_the_run_with_a_clear_error(ray_local):
    from medcam.pipeline import PipelineError
    from tests._ray_helpers import BrokenSetupWork

    records = []
    with pytest.raises(PipelineError, match="a Ray worker could not start.*cannot set up on cpu"):
        RayExecutor(workers=1).run(BrokenSetupWork(), ["a", "b"], records.append)
    assert records == []
