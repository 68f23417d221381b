"""Helpers of benchmarks/ that are not part of the package (the allocator setting of the CPU benchmark)."""

import importlib.util
from pathlib import Path

import pytest


def _load_cpu_memory():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_memory.py"
    spec = importlib.util.spec_from_file_location("benchmarks_cpu_memory", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_keep_freed_memory_is_applied_on_glibc_and_harmless_elsewhere(monkeypatch):
    """The benchmark's allocator setting: applied where glibc takes it, a no-op (False) elsewhere."""
    import ctypes
    import sys as _sys

    cm = _load_cpu_memory()

    if _sys.platform.startswith("linux"):
        assert cm.keep_freed_memory() == hasattr(ctypes.CDLL(None), "mallopt")
    with pytest.raises(ValueError, match="trim_threshold=2147483648 bytes"):
        cm.keep_freed_memory(trim_threshold=2**31)  # would wrap round to a negative C int
    with pytest.raises(ValueError, match="mmap_threshold=-1 bytes"):
        cm.keep_freed_memory(mmap_threshold=-1)

    class OldGlibc:  # takes the trim threshold, refuses mmap thresholds over 32 MiB
        def __init__(self):
            self.calls = []

            def mallopt(option, value):
                self.calls.append((option, value))
                return int(option != -3 or value <= 32 * 2**20)

            self.mallopt = mallopt

    libc = OldGlibc()
    monkeypatch.setattr(cm.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(cm.sys, "platform", "linux")
    assert cm.keep_freed_memory() is True
    assert libc.calls == [(-1, 2**31 - 1), (-3, 2**30), (-3, 32 * 2**20)]  # 1 GiB refused: 32 MiB used instead
    monkeypatch.setattr(cm.ctypes, "CDLL", lambda name: object())  # a C library without mallopt (musl)
    monkeypatch.setattr(cm.sys, "platform", "linux")
    assert cm.keep_freed_memory() is False
    monkeypatch.setattr(cm.sys, "platform", "darwin")
    assert cm.keep_freed_memory() is False
