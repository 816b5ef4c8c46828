"""Ray start-up: an embedded local Ray by default, the cluster named by RAY_ADDRESS when it is set."""
from __future__ import annotations

import logging
import os

import ray

from training import NAMESPACE


class _DropQueueLengthProbes(logging.Filter):
    """The driver's own handles log missed queue-length probes on `ray.serve`; they say nothing to a person."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "queue length" not in record.getMessage()


def init_ray(num_cpus: int | None = None) -> None:
    """Connects to RAY_ADDRESS if set (a `ray start` cluster or a job's cluster), else starts an embedded Ray."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    serve_logger = logging.getLogger("ray.serve")
    serve_logger.setLevel(logging.WARNING)  # the driver's per-deploy INFO lines; the demo prints its own progress
    serve_logger.addFilter(_DropQueueLengthProbes())
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # The project's packages travel with jobs as the working_dir; local runs import them from the install.
    kwargs = {"namespace": NAMESPACE, "logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
