"""Networks for the Ray executor tests, importable by Ray worker processes (they unpickle them by reference).

:class:`KillingNet` wraps a network and SIGKILLs the process running it (a Ray worker) during a case's forward pass:
once overall (the first forward after ``kill_once_marker`` is armed), and on every forward whose input is one of
``poison`` (input sums of cases that must kill every worker they reach).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
from torch import nn

REGIONS = ("TC", "WT", "ET")


def tiny_net() -> nn.Module:
    """A small random SegResNet (4 -> 3 channels), the same weights on every call."""
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    return SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=8, blocks_down=(1, 1, 1, 1)).eval()


class KillingNet(nn.Module):
    """``net`` whose forward kills its own process (SIGKILL) as configured; the outputs are ``net``'s otherwise.

    Args:
        net: the wrapped network.
        control: a folder; ``control/kill-once`` present = the next forward (in any process) deletes it and dies;
            ``control/killed.log`` gets one line per kill (``<case input sum> <pid>``).
        poison: input sums (``x.sum()`` of the whole ``[1, C, *S]`` input) on which every forward dies.
        delay_s: seconds to sleep in every forward (to keep a case running while a test interrupts the driver).
    """

    def __init__(self, net: nn.Module, control: str, poison: tuple[float, ...] = (), delay_s: float = 0.0):
        super().__init__()
        self.net = net
        self.control = str(control)
        self.poison = tuple(float(p) for p in poison)
        self.delay_s = float(delay_s)

    def _die(self, total: float) -> None:
        with open(Path(self.control) / "killed.log", "a", encoding="utf-8") as f:
            f.write(f"{total:.6g} {os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGKILL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = float(x.detach().double().sum())
        if any(abs(total - p) <= 1e-4 * max(1.0, abs(p)) for p in self.poison):
            self._die(total)
        try:
            os.remove(Path(self.control) / "kill-once")  # atomic: only one process wins the kill
        except FileNotFoundError:
            pass
        else:
            self._die(total)
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.net(x)


def slow_tiny_net() -> nn.Module:
    """:func:`tiny_net` taking 1 s per forward pass (a cohort that is still running when a test interrupts it)."""
    return KillingNet(tiny_net(), control="/nonexistent-medcam-control", delay_s=1.0).eval()


class BrokenSetupWork:
    """A work object whose set-up fails on a worker (e.g. a model that cannot be moved to the worker's device)."""

    log_dir = None

    def setup(self, device=None):
        raise RuntimeError(f"cannot set up on {device}")

    def run_case(self, source):  # pragma: no cover - never reached
        return {"case_id": source, "status": "ok", "seconds": 0.0}

    def failed_record(self, source, error):  # pragma: no cover - never reached
        return {"case_id": source, "status": "failed", "error": error, "seconds": 0.0}

    def discard_partial(self, source):
        pass

    def cost(self, source):
        return 0.0
