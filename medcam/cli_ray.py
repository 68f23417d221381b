"""The ``--ray [ADDRESS]`` option group of ``medcam explain`` and ``medcam evaluate`` (declared once, here)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def ray_options(fn: Callable) -> Callable:
    """--ray [ADDRESS] and the options of its workers (shared by explain and evaluate)."""
    opts = [
        click.option(
            "--ray",
            "ray_address",
            is_flag=False,
            flag_value="local",
            default=None,
            metavar="[ADDRESS]",
            help="Run the cases on Ray workers: --ray alone starts a local Ray instance (all CPUs/GPUs here); "
            "--ray auto joins the cluster of `ray start`; --ray ray://HEAD:10001 joins through Ray Client. "
            "Needs pip install 'medcam[ray]'.",
        ),
        click.option(
            "--gpus-per-worker",
            type=float,
            default=None,
            help="GPU share of each Ray worker (0.5 = two workers per GPU, 0 = CPU workers). "
            "[default: 1 if the cluster has GPUs, else 0]",
        ),
        click.option(
            "--cpus-per-worker",
            type=float,
            default=1,
            show_default=True,
            help="CPU cores of each Ray worker (its torch threads).",
        ),
        click.option(
            "--workers",
            type=int,
            default=None,
            help="Number of Ray workers. [default: as many as the cluster's GPUs (or CPUs) allow]",
        ),
        click.option(
            "--max-retries",
            type=int,
            default=2,
            show_default=True,
            help="Ray: how often a case is retried on another worker when its worker dies (killed, out of memory).",
        ),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def ray_executor_from_options(
    ray_address: str | None,
    gpus_per_worker: float | None,
    cpus_per_worker: float,
    workers: int | None,
    max_retries: int,
    device: str,
) -> Any:
    """None (this process) or the Ray executor the options ask for (checked before any case is loaded)."""
    if ray_address is None:
        if gpus_per_worker is not None or workers is not None:
            raise click.UsageError("--gpus-per-worker and --workers need --ray")
        return None
    from .pipeline.executors import ray_executor

    if gpus_per_worker is None and device == "cpu":
        gpus_per_worker = 0.0  # --device cpu: CPU workers
    return ray_executor(
        None if ray_address == "local" else ray_address,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        workers=workers,
        max_retries=max_retries,
    )
