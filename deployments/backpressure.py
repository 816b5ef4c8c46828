"""What every deployment answers when it is full: 503 with `Retry-After`, from Serve's proxy and handles
(`BackpressureConfig`, when a deployment's `max_queued_requests` is reached) as from the ingress's own admission
control (`deployments/ingress/admission.py`)."""
from __future__ import annotations

from ray.serve.config import BackpressureConfig

RETRY_AFTER_S = 1
SHED = BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S)
