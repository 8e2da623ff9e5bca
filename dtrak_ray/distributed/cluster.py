"""Connecting to Ray: a local instance by default, or an existing cluster (``address``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray

from dtrak_ray.errors import ConfigError

_started_here = False  # whether connect() started the local instance (a fixed size: nothing will be added)


@dataclass(frozen=True)
class Resources:
    """What one worker asks of the cluster, and how many run at once."""

    workers: int
    cpus: float = 1.0
    gpus: float = 0.0
    torch_threads: int = 1


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start or join Ray. Only entrypoints call this; nothing starts Ray at import time.

    ``address`` None starts a local instance (dashboard off, so nothing listens beyond loopback)
    unless ``RAY_ADDRESS`` names a cluster; "auto" joins the cluster this machine belongs to.
    """
    global _started_here
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::FutureWarning"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        # A local instance is one machine: its node address is loopback, so the HTTP servers Ray starts
        # even without the dashboard (the dashboard agent, the metrics exporters of the dashboard head and
        # the autoscaler) bind 127.0.0.1 instead of every interface. Ray resolves "127.0.0.1" passed as
        # _node_ip_address to the machine's address unless clustering is off (what it does on macOS).
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=True,
                 _system_config={"enable_metrics_collection": False})
        _started_here = True


def require_fit(cpus_per_worker: float, gpus_per_worker: float) -> None:
    """Refuse a worker size that the local instance connect() started can never schedule.

    Ray would wait for such a worker forever, silently. On a cluster joined by address an autoscaler
    may still add a node that fits, so there Ray's own warning about infeasible tasks stands.
    """
    if not _started_here:
        return
    total = ray.cluster_resources()
    gpus, cpus = total.get("GPU", 0), total.get("CPU", 0)
    if gpus_per_worker > gpus:
        raise ConfigError(
            f"resources.gpus_per_worker={gpus_per_worker:g}, but the local Ray instance on this machine has {gpus:g} GPUs: "
            "set resources.gpus_per_worker=0 to run on CPUs, or pass --address of a cluster with GPUs"
        )
    if cpus_per_worker > cpus:
        raise ConfigError(
            f"resources.cpus_per_worker={cpus_per_worker:g}, but the local Ray instance has {cpus:g} CPUs (this machine's, or "
            f"resources.num_workers when set): set resources.cpus_per_worker to at most {cpus:g}, or pass --address of a larger cluster"
        )


def available_workers(cpus_per_worker: float, gpus_per_worker: float) -> int:
    """How many workers of this size fit in the cluster as it is now (at least one)."""
    total = ray.cluster_resources()
    by_cpu = int(total.get("CPU", 1) // cpus_per_worker)
    if gpus_per_worker > 0:
        return max(1, min(by_cpu, int(total.get("GPU", 0) // gpus_per_worker)))
    return max(1, by_cpu)


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
