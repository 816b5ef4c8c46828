"""Offline evaluation: the harness behind `recsys eval` (every model on the same split and metrics), the sampled
protocol for comparison with papers, the ranking and policy report sections, counterfactual replay, and the report
with its plots (the only place matplotlib is imported).

May import: every other subpackage of `training`. Nothing imports this but `cluster/` (the CLI) and tests."""
