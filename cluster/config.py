"""One typed configuration, loaded from one YAML file; unknown keys are errors that name the key."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deployments.app import ServingConfig
from deployments.rollout.gate import RolloutConfig
from indexing.embed import IndexConfig
from training.request.policy_config import PolicyConfig
from training.fit.train_loop import TrainConfig

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class DataConfig:
    size: str = "demo"  # synthetic shop size: tiny | small | demo | large
    seed: int = 0
    dir: str = "data/shop"


@dataclass(frozen=True)
class DemoConfig:
    # Two versions from the same data with different seeds, split 90/10 as a canary would be.
    versions: dict[str, float] = field(default_factory=lambda: {"v1": 90.0, "v2": 10.0})
    # version -> retrieval model (training.fit.version.RETRIEVAL_MODELS); a version not named uses train.retrieval_model.
    retrieval: dict[str, str] = field(default_factory=dict)
    bundles_dir: str = "bundles"
    users: int = 300  # distinct users in the demo's traffic (split observed over them)
    # Versions after the first reuse its ranker when data and ranker settings match: the demo's versions differ in
    # retrieval only, and a second identical ranker training would cost minutes and teach nothing.
    share_ranker: bool = True
    requests: int = 300


@dataclass(frozen=True)
class RecsysConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # the gate's thresholds and the live guards
    demo: DemoConfig = field(default_factory=DemoConfig)


def _build(cls: type, data: dict[str, Any] | None, where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ValueError(f"config {where}: expected a mapping, got {type(data).__name__}")
    if cls is PolicyConfig:
        try:
            return PolicyConfig.from_dict(data)
        except ValueError as e:
            raise ValueError(f"config {where}: {e}") from e
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"config {where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}" if where else name)
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"config {where}.{name}: expected true/false, got {value!r}")
        elif isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"config {where}.{name}: expected an integer, got {value!r}")
            kwargs[name] = value
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"config {where}.{name}: expected a number, got {value!r}")
            kwargs[name] = float(value)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except ValueError as e:  # a dataclass's own validation: say where in the file it was
        raise ValueError(f"config {where}: {e}") from e


def load_config(path: str | Path | None = None) -> RecsysConfig:
    """Reads a YAML config (a name from cluster/configs, e.g. "tiny", or a path); None gives the defaults."""
    if path is None:
        return RecsysConfig()
    p = Path(path)
    if not p.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
        p = CONFIG_DIR / f"{path}.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"config {path}: no such file (built-in names: "
                                f"{sorted(q.stem for q in CONFIG_DIR.glob('*.yaml'))})")
    return _build(RecsysConfig, yaml.safe_load(p.read_text()) or {}, "")
