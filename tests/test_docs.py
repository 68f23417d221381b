"""The documentation cannot go stale: every ```python block of README.md and docs/**/*.md is run, and the site builds
with ``mkdocs build --strict`` with every public name in its API reference.

The blocks of one page run in order in one namespace (like a notebook), in a fresh temporary folder that holds a
phantom BraTS case ``BraTS2021_00000/`` (the 10-line example's input). A block that needs what a test cannot have
(a trained nnU-Net model folder, a MONAI bundle, a Ray cluster, minutes of CPU) is marked, on the line before its
fence, with ``<!-- docs-test: skip REASON -->``: it is still parsed and its ``medcam`` imports resolved, and it is
reported as a skipped test naming the page, the line and the reason (``pytest -ra`` lists them all).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b\s*(.*?)\s*-->")
FENCE = re.compile(r"^(`{3,})\s*(\w*)")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # of the first code line
    code: str
    skip: str | None  # the reason, or None: the block runs

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    """The fenced ```python blocks of a Markdown file, with the skip marker of the line before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i].strip())
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), len(lines))
        if lang in ("python", "py"):
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            if before.strip().startswith("<!-- --8<--"):  # a snippet-section marker between the skip mark and fence
                before = lines[i - 2] if i >= 2 else ""
            marker = SKIP.search(before)
            if marker and not marker.group(1):
                raise ValueError(f"{path}:{i}: a docs-test skip marker needs a reason")
            code = "\n".join(lines[i + 1 : end])
            page = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
            out.append(Block(page, i + 2, code, marker.group(1) if marker else None))
        i = end + 1
    return out


ALL = [b for p in PAGES for b in blocks_of(p)]
RUNNABLE = {page: [b for b in ALL if b.page == page] for page in dict.fromkeys(b.page for b in ALL if not b.skip)}
SKIPPED = [b for b in ALL if b.skip]


@pytest.fixture(scope="module")
def brats_case(tmp_path_factory) -> Path:
    from medcam.data.phantoms import write_phantom_case

    # 3 mm: a third of the time of 2 mm to generate (the examples resample to the model's 2 mm anyway)
    return write_phantom_case(tmp_path_factory.mktemp("docs_case"), seed=0, spacing_mm=3.0, case_id="BraTS2021_00000")


@pytest.mark.parametrize("page", list(RUNNABLE), ids=list(RUNNABLE))
def test_python_blocks_of_a_page_run(page, tmp_path, monkeypatch, request):
    import matplotlib

    matplotlib.use("Agg")
    import torch

    monkeypatch.chdir(tmp_path)
    if any("BraTS2021_00000" in b.code for b in RUNNABLE[page]):  # the phantom only for the pages that read it
        case = request.getfixturevalue("brats_case")
        (tmp_path / case.name).symlink_to(case, target_is_directory=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: on a small shared CPU more threads spin against each other
    namespace: dict[str, object] = {"__name__": "__docs__"}
    try:
        for block in RUNNABLE[page]:
            if block.skip is None:
                # compiled under the page's name and the block's first line: a traceback points into the Markdown
                exec(compile("\n" * (block.line - 1) + block.code, block.page, "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
        import matplotlib.pyplot as plt

        plt.close("all")


def _check_imports(block: Block) -> None:
    """The block parses, and every name it imports from medcam exists (the part of a skipped block that can rot)."""
    tree = ast.parse(block.code, filename=block.where)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "medcam":
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    importlib.import_module(f"{node.module}.{alias.name}")  # a submodule, else ImportError
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "medcam":
                    importlib.import_module(alias.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "medcam":
            import medcam

            assert hasattr(medcam, node.attr), f"{block.where}: medcam.{node.attr} does not exist"


@pytest.mark.parametrize("block", SKIPPED, ids=[b.where for b in SKIPPED])
def test_skipped_blocks_parse_and_import(block):
    _check_imports(block)
    pytest.skip(f"docs block {block.where} not run: {block.skip}")


def test_the_block_finder_reads_fences_and_skip_markers(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "text\n```python\nx = 1\n```\n\n<!-- docs-test: skip needs a GPU -->\n```python\ny = 2\n```\n"
        "```bash\nls\n```\n````python\nz = '```'\n````\n"
    )
    got = [(b.line, b.code, b.skip) for b in blocks_of(page)]
    assert got == [(3, "x = 1", None), (8, "y = 2", "needs a GPU"), (14, "z = '```'", None)]
    page.write_text("<!-- docs-test: skip -->\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="needs a reason"):
        blocks_of(page)


def test_every_page_with_code_is_covered_and_skips_are_few():
    """README's 10-line example runs; at most a handful of blocks are skipped, each listed with its reason."""
    assert any(b.page == "README.md" and "load_brats_case" in b.code and not b.skip for b in ALL)
    assert len(RUNNABLE) >= 5, sorted(RUNNABLE)
    listing = "\n".join(f"{b.where}: {b.skip}" for b in SKIPPED)
    print(f"{len(SKIPPED)} docs blocks skipped:\n{listing}")
    assert len(SKIPPED) <= 8, listing


API_PAGES = {
    "medcam": "api/medcam",
    "medcam.targets": "api/targets",
    "medcam.metrics": "api/metrics",
    "medcam.pipeline": "api/pipeline",
    "medcam.frameworks": "api/frameworks",
    "medcam.amecam": "api/amecam",
}
SUBPACKAGE_PAGES = {"targets": "api/targets", "metrics": "api/metrics", "amecam": "api/amecam"}


def test_site_builds_strictly_and_documents_every_public_name(tmp_path):
    """``mkdocs build --strict`` (a broken link, anchor or reference fails) and, in the built API pages, an entry
    (an HTML id) for every name of each package's ``__all__``."""
    if importlib.util.find_spec("mkdocs") is None:
        if os.environ.get("CI"):
            pytest.fail("mkdocs is not installed: CI installs the docs extra (make venv)")
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-4000:]
    missing = []
    for package, page in API_PAGES.items():
        html = (site / page / "index.html").read_text(encoding="utf-8")
        for name in importlib.import_module(package).__all__:
            if package == "medcam" and name in SUBPACKAGE_PAGES:
                assert (site / SUBPACKAGE_PAGES[name] / "index.html").is_file()
                continue
            if not re.search(rf'id="medcam[\w.]*\.{re.escape(name)}"', html):
                missing.append(f"{package}.{name}")
    assert not missing, f"public names without an API entry: {missing}"


def test_sphinx_roles_become_code_spans_in_the_api_reference():
    if importlib.util.find_spec("griffe") is None:
        pytest.skip("griffe is not installed (pip install -e '.[docs]')")
    spec = importlib.util.spec_from_file_location("sphinx_roles", ROOT / "docs" / "_griffe" / "sphinx_roles.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = "See :class:`~medcam.data.VolumeCase` and :func:`medcam.pipeline.load_case`, :mod:`x <medcam.io>`::\n"
    assert module.rewrite(text) == "See `VolumeCase` and `medcam.pipeline.load_case`, `x`:\n"
    assert module.rewrite("a :: b\nc: d") == "a :: b\nc: d"


def test_readme_is_short_and_every_docs_page_is_in_the_navigation():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 150
    yaml = pytest.importorskip("yaml")  # installed with mkdocs (the docs extra)
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))

    def pages(node: object) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, dict):
            return [p for v in node.values() for p in pages(v)]
        if isinstance(node, list):
            return [p for v in node for p in pages(v)]
        return []

    nav = pages(config["nav"])
    files = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(nav) == files and len(set(nav)) == len(nav)
