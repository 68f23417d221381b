"""Package structure: no import cycles (lazy imports included), the library never imports the CLI, importing and
calling medcam leaves process-global state alone."""

from __future__ import annotations

import ast
import logging
import warnings
from pathlib import Path

import torch
from click.testing import CliRunner

PACKAGE = Path(__file__).resolve().parents[1] / "medcam"


def _import_graph() -> dict[str, set[str]]:
    """medcam module -> medcam modules it imports anywhere in its source (function-level imports too)."""
    mods: dict[str, tuple[Path, bool]] = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.with_suffix("").relative_to(PACKAGE.parent).parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, (p, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom):
                pkg = m.split(".") if is_pkg else m.split(".")[:-1]
                if node.level == 0:
                    base = node.module or ""
                else:
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for t in names:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != m:
                    graph[m].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_and_the_library_never_imports_the_cli():
    graph = _import_graph()
    assert "medcam.engine" in graph and "medcam.sliding" in graph["medcam.engine"]  # the graph is real
    assert _cycles(graph) == []
    importers = sorted(m for m, deps in graph.items() if "medcam.cli" in deps)
    assert importers == [], f"{importers} import the command line"


def test_a_command_leaves_logging_and_warning_filters_as_they_were(tmp_path):
    from medcam.cli import main

    log = logging.getLogger("medcam")
    before = (list(log.handlers), log.level, log.propagate, list(warnings.filters), logging.getLogger().handlers[:])
    r = CliRunner().invoke(main, ["explain", str(tmp_path / "missing"), "-o", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 1 and "does not exist" in r.stderr
    after = (list(log.handlers), log.level, log.propagate, list(warnings.filters), logging.getLogger().handlers[:])
    assert after == before


def test_explaining_changes_no_global_torch_state():
    import medcam
    from tests._nets import LinearHeadNet

    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    medcam.SegGradCAMPlusPlus(LinearHeadNet(), "feat")(torch.randn(1, 2, 8, 8, 8), medcam.targets.ClassROI(0))
    assert (torch.is_grad_enabled(), torch.get_num_threads()) == (grad, threads)


def test_explain_and_evaluate_share_their_options():
    """Options declared once: every shared option is accepted by both commands and maps onto RunSettings."""
    from medcam.cli import evaluate_cmd, explain_cmd, run_settings

    shared = {"--model", "--checkpoint", "--target", "--regions", "--activation", "--threshold", "--channel-order",
              "--spacing", "--orientation", "--crop-foreground", "--normalize", "--divisible-by", "--roi-size",
              "--overlap", "--sw-batch-size", "--blend", "--device", "--amp", "--method", "--layer", "--overwrite",
              "--quiet", "--verbose", "--debug"}  # fmt: skip

    def opts(cmd):
        return {o for p in cmd.params for o in p.opts if o.startswith("--")}

    assert shared <= opts(explain_cmd) and shared <= opts(evaluate_cmd)
    kw = {"model_spec": "demo", "checkpoint": None, "methods": ("gradcam,hirescam",), "targets": ("ET",),
          "layers": ("a", "b"), "regions": "TC,WT,ET", "activation": None, "channel_order": "T1CE,t1,t2,flair",
          "threshold": 0.4, "spacing": "2", "orientation": "las", "crop_foreground": False, "normalize": None,
          "divisible_by": None, "roi_size": "64", "overlap": 0.5, "sw_batch_size": 2, "blend": "gaussian",
          "device": "cpu", "amp": True, "overwrite": True}  # fmt: skip
    s = run_settings(kw, quiet=True)
    assert kw == {}  # every shared option was consumed
    assert s.methods == ["gradcam", "hirescam"] and s.layers == ["a", "b"] and s.regions == ["TC", "WT", "ET"]
    assert s.channel_order == ["t1ce", "t1", "t2", "flair"] and s.roi_size == (64, 64, 64) and s.amp
    assert s.preprocessing == {"spacing": (2.0, 2.0, 2.0), "orientation": "LAS", "crop_foreground": False}
    assert (s.overlap, s.sw_batch_size, s.blend, s.progress, s.overwrite) == (0.5, 2, "gaussian", False, True)
