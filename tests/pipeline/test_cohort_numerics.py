"""Issue 30 item 6: the numerics that change maps (torch threads, deterministic switches, device) are recorded,
applied to every case wherever it runs, restored afterwards, and never mixed by a resume."""

from __future__ import annotations

import json

import pytest
import torch

from medcam.pipeline import PipelineError
from medcam.pipeline.cohort import run_cohort
from medcam.pipeline.numerics import DEFAULT_THREADS, applied, check_threads, numerics_settings
from tests.pipeline._fakes import MapWork, make_cases


def _summary(out, case_id):
    return json.loads((out / case_id / "summary.json").read_text())


def test_every_case_runs_with_the_recorded_threads_and_the_process_keeps_its_own(tmp_path):
    cases = make_cases(tmp_path, 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run = run_cohort(cases, MapWork(), tmp_path / "o", settings={"s": 1}, progress=False)
        assert torch.get_num_threads() == 2  # restored after the cases
        assert run["settings"]["numerics"]["torch_threads"] == DEFAULT_THREADS == 1
        for c in cases:
            s = _summary(tmp_path / "o", c.case_id)
            assert s["threads_seen"] == 1 and s["numerics"]["torch_threads"] == 1
            assert s["numerics"]["device"] == "cpu" and s["settings"]["numerics"]["torch_threads"] == 1
        run = run_cohort(cases, MapWork(), tmp_path / "t2", settings={"s": 1}, progress=False, threads=2)
        assert {_summary(tmp_path / "t2", c.case_id)["threads_seen"] for c in cases} == {2}
    finally:
        torch.set_num_threads(before)


def test_resume_refuses_a_folder_made_with_other_numerics_naming_them(tmp_path):
    cases = make_cases(tmp_path, 2)
    out = tmp_path / "o"
    run_cohort(cases, MapWork(), out, settings={"s": 1}, progress=False)
    assert run_cohort(cases, MapWork(), out, settings={"s": 1}, progress=False)["skipped"] == 2
    with pytest.raises(PipelineError, match=r"other settings \(numerics.torch_threads: 1 -> 2\)"):
        run_cohort(cases, MapWork(), out, settings={"s": 1}, progress=False, threads=2)
    # a folder computed on another device is not mixed in either
    with pytest.raises(PipelineError, match="was computed on cpu, this run computes on cuda"):
        run_cohort(cases, MapWork(device="cuda"), out, settings={"s": 1}, progress=False)


def test_switches_are_applied_and_restored():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = {**numerics_settings(3), "cudnn_benchmark": True}
        with applied(want):
            assert torch.get_num_threads() == 3 and torch.backends.cudnn.benchmark
        assert torch.get_num_threads() == 2 and not torch.backends.cudnn.benchmark
    finally:
        torch.set_num_threads(before)
    with pytest.raises(PipelineError, match="--threads must be a whole number >= 1"):
        check_threads(0)
