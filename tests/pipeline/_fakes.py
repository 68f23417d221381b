"""A tiny, fast per-case work for the cohort fault tests: writes a torch-computed map and records its numerics."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medcam.pipeline.cases import CaseSource


def make_cases(root: Path, n: int = 3, size: int = 4096) -> list[CaseSource]:
    """``n`` one-file cases under ``root/inputs`` (each file ``size`` bytes)."""
    (root / "inputs").mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        f = root / "inputs" / f"c{i}.bin"
        if not f.exists() or f.stat().st_size != size:  # kept as it is: a rewrite changes its fingerprint
            f.write_bytes(bytes([i]) * size)
        cases.append(CaseSource(f"c{i}", "volumes", [str(f)]))
    return cases


@dataclass
class MapWork:
    """``work(source, staging) -> summary``: one float32 map (``map.npy``, ``nbytes`` bytes) made by a torch
    convolution (its last bits depend on the thread count), the torch threads seen, and optional faults."""

    device: str = "cpu"
    nbytes: int = 64 * 1024
    fail: tuple[str, ...] = ()
    calls_file: str | None = None

    def __call__(self, src: CaseSource, staging: Path) -> dict[str, Any]:
        if src.case_id in self.fail:
            raise ValueError(f"bad case {src.case_id}")
        if self.calls_file:
            with open(self.calls_file, "a", encoding="utf-8") as fh:
                fh.write(src.case_id + "\n")
        seed = int(src.case_id.lstrip("c") or 0)
        n = self.nbytes // 4
        x = torch.randn(1, 1, n, generator=torch.Generator().manual_seed(seed))
        y = torch.nn.functional.conv1d(x, torch.ones(1, 1, 9) / 9, padding=4)[0, 0]
        np.save(staging / "map.npy", y.numpy())
        (staging / "extra.json").write_text(json.dumps({"case": src.case_id}))
        return {"threads_seen": torch.get_num_threads(), "maps": [{"file": "map.npy"}]}
