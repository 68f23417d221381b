"""Executors without Ray: choosing one, the --ray options' errors, and an executor object driving explain_cohort."""

from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner

from medcam.cli import main
from medcam.pipeline import PipelineError, discover_cases, explain_cohort, load_model, make_inferer, parse_targets
from medcam.pipeline import executors as ex_mod
from medcam.pipeline.executors import LocalExecutor, input_bytes, resolve_executor
from tests._cli_helpers import assert_one_line_error
from tests.test_pipeline import REGIONS, cases_root, tiny_demo  # noqa: F401 - fixtures


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_without_ray_the_ray_option_says_how_to_install_it(monkeypatch, cases_root):  # noqa: F811
    monkeypatch.setattr(ex_mod, "ray_available", lambda: False)
    r = run(["explain", cases_root, "-o", cases_root.parent / "o", "--ray"])
    assert_one_line_error(r, "Ray is not installed", "pip install 'medcam[ray]'")
    r = run(["evaluate", cases_root, "-o", cases_root.parent / "e", "--ray", "auto"])
    assert r.exit_code == 1 and "pip install 'medcam[ray]'" in r.stderr
    with pytest.raises(PipelineError, match="pip install 'medcam.ray.'"):
        resolve_executor("ray")


def test_ray_option_errors(cases_root, tmp_path):  # noqa: F811
    # an input taken as the address (--ray before the inputs) is caught with the fix
    r = run(["explain", "--ray", cases_root, "-o", tmp_path / "o"])
    assert r.exit_code != 0
    r = run(["explain", cases_root, "-o", tmp_path / "o", "--ray", "not an address"])
    assert_one_line_error(r, "is not a Ray address", "--ray=ADDRESS")
    r = run(["explain", cases_root, "-o", tmp_path / "o", "--gpus-per-worker", "0.5"])
    assert r.exit_code == 2 and "need --ray" in r.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(PipelineError, match="unknown executor"):
        resolve_executor("dask")
    with pytest.raises(PipelineError, match="need executor='ray'"):
        resolve_executor("local", workers=2)
    assert isinstance(resolve_executor(None), LocalExecutor)


class ShuffledExecutor:
    """Runs the cases in a random order, as a pool of workers would finish them."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def run(self, work, sources, on_record):
        ready = work.setup()
        order = list(sources)
        random.Random(1).shuffle(order)
        for src in order:
            self.seen.append(src.case_id)
            on_record(ready.run_case(src))


def test_executor_object_gives_the_local_summary(tiny_demo, cases_root, tmp_path):  # noqa: F811
    cases = discover_cases([cases_root])
    assert [input_bytes(c) > 0 for c in cases] == [True, True]
    model = load_model("demo")
    specs = parse_targets(["WT"], REGIONS)
    kw = dict(png=False, slicer=False, progress=False, settings={"s": 1})
    inferer = make_inferer(model.roi_size)
    local = explain_cohort(cases, model, ["gradcam"], specs, None, inferer, tmp_path / "a", **kw)
    ex = ShuffledExecutor()
    other = explain_cohort(cases, model, ["gradcam"], specs, None, inferer, tmp_path / "b", executor=ex, **kw)
    assert sorted(ex.seen) == [c.case_id for c in cases]

    def strip(run):
        return [{k: v for k, v in c.items() if k != "seconds"} for c in run["cases"]]

    assert strip(other) == strip(local) and other["ok"] == 2
    disk = json.loads((tmp_path / "b" / "cohort_summary.json").read_text())
    assert [c["case_id"] for c in disk["cases"]] == [c.case_id for c in cases]
    # resume is decided before the executor: nothing is handed to it
    ex2 = ShuffledExecutor()
    again = explain_cohort(cases, model, ["gradcam"], specs, None, inferer, tmp_path / "b", executor=ex2, **kw)
    assert ex2.seen == [] and again["skipped"] == 2


def test_discard_partial_removes_only_that_cases_staging_folders(tmp_path):
    from medcam.pipeline import CaseSource
    from medcam.pipeline.cohort import CohortJob

    names = [".partial-abcd1234-X", ".partial-123@node_1.a-abcd1234-X"]
    keep = [".partial-abcd1234-Y-X", ".partial-abcd1234-X2", "X", ".old-abcd1234-X"]
    for n in names + keep:
        (tmp_path / n).mkdir()
    job = CohortJob(work=None, root=tmp_path)  # type: ignore[arg-type]
    job.discard_partial(CaseSource("X", "volumes", []))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
