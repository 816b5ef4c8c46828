"""Models: one file per model (config dataclass, modules, forward returning the loss), the shared embedding and
attention blocks, sampled softmax and its samplers, and the retrieval and ranking baselines. Plain PyTorch/NumPy.

May import: `training.data`, `training.metrics`."""
