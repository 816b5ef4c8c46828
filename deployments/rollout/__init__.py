"""Versioned rollout: a candidate version (green) deployed beside the serving ones (blue), validated by a gate,
shifted to in steps under live guards, rolled back in one call, retired with its index shards.

- `figures.py`: what each ingress replica records per version (requests, errors, empty and mixed answers, latency,
  shadow diffs) and reports once a second, and their aggregation; plain Python.
- `gate.py`: the thresholds (`RolloutConfig`), the validation gate's checks and the live guards; plain Python.
- `controller.py`: the `recsys-rollout` actor that runs the operations (Serve applications, index build, routing
  publishes through the routing registry), driven by the admin endpoints and `recsys rollout`.

The traffic split itself is the routing of `deployments.ingress.routing`, published through its registry: a step,
a rollback or a retirement is effective for the next request on every ingress replica, and a request's version is
fixed when it starts, so no answer mixes versions.
"""

CONTROLLER_NAME = "recsys-rollout"
REPORT_S = 1.0  # each ingress replica reports its figures this often
