"""The bottom layer: data contracts, models, training on Ray Train, the request-time cores and offline evaluation.

Subpackages, imports flowing one way (`tests/unit/test_layers.py` enforces it):
    data/  <-  models/  <-  request/  <-  fit/  <-  evaluation/
`metrics.py` (plain NumPy) may be imported by any of them. Nothing in training/ imports Ray Serve, and neither
production training (`fit/`) nor serving ever imports `evaluation/`.
"""

NAMESPACE = "recsys"  # the Ray namespace of every named actor (shards, online store, policy registry) and job
