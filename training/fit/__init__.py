"""Fitting: the Ray Train loop (one for every model), bundles (one immutable version on disk), the registry of
trainable retrieval models and their adapters, and version training (`recsys train`) with its offline metrics.

May import: `training.data`, `training.models`, `training.request`, `training.metrics`; never `training.evaluation`."""
