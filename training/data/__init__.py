"""Data: the Arrow contracts and their readers, the synthetic shop and its hidden truth, loaders of public data sets,
feature encoding, the evaluation splits and the example builders of training.

May import: `training.metrics` only. Everything above imports this."""
