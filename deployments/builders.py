"""Typed application builders: the import paths of a Serve config file (`serve deploy`, a KubeRay `RayService`).

`recsys serve --emit-config FILE.yaml` writes a config whose applications name these builders with their `args`;
the Ingress's versions, weights and policy are its `user_config` (under `deployments:`), so editing them in the file
and running `serve deploy` again applies them in place through `reconfigure`, without restarting a replica, while
a change of `args` rebuilds the application.

No `from __future__ import annotations`: Serve reads each builder's parameter annotation to validate `args` with
the pydantic model, and a string annotation would hand the builder an unchecked dict.
"""
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray.serve import Application

from deployments.app import ServingConfig, build_ingress_app, build_version_app
from deployments.rollout.controller import shop_gate_users, start_controller
from deployments.rollout.gate import RolloutConfig
from deployments.store import EMBEDDED, create_store
from indexing.embed import IndexConfig
from indexing.index_types import IndexSpec


def _serving(value: dict[str, Any]) -> dict[str, Any]:
    try:
        ServingConfig(**value)
    except TypeError as e:  # an unknown key
        raise ValueError(f"serving: {e}") from e
    return value


class _AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    serving: dict[str, Any] = Field(default_factory=dict, description="ServingConfig fields")

    @field_validator("serving")
    @classmethod
    def _check_serving(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _serving(value)


class VersionAppArgs(_AppArgs):
    """`recsys-<version>`: one version's Retrieval, Ranking and Version deployments, from its bundle."""
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    bundle: str = Field(min_length=1, description="the bundle folder, on storage every node reads")


class IngressAppArgs(_AppArgs):
    """`recsys`: the HTTP ingress. `versions` and `policy` are also its user_config, which is what a re-deploy of
    the file changes in place."""
    versions: dict[str, float] = Field(min_length=1)
    policy: dict[str, Any] = Field(default_factory=dict)
    admin_token_sha256: str | None = None
    # The shop folder: the embedded store's actor seeds itself from it (created here unless it runs), and with it
    # the rollout controller starts (or is re-configured) here, its gate topped up with the shop's users.
    shop_dir: str | None = None
    index: dict[str, Any] = Field(default_factory=dict, description="IndexConfig fields: how a rollout indexes")
    rollout: dict[str, Any] = Field(default_factory=dict, description="RolloutConfig fields: the gate, the guards")

    @field_validator("index")
    @classmethod
    def _check_index(cls, value: dict[str, Any]) -> dict[str, Any]:
        index_config(value)
        return value

    @field_validator("rollout")
    @classmethod
    def _check_rollout(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            RolloutConfig(**value)
        except TypeError as e:  # an unknown key
            raise ValueError(f"rollout: {e}") from e
        return value


def index_config(value: dict[str, Any]) -> IndexConfig:
    """`IndexConfig.to_dict()` read back (its `ann` a nested IndexSpec); an unknown key is a ValueError naming it."""
    try:
        return IndexConfig(**{**value, "ann": IndexSpec(**value.get("ann", {}))})
    except TypeError as e:
        raise ValueError(f"index: {e}") from e


def version_app(args: VersionAppArgs) -> Application:
    return build_version_app(args.bundle, args.version, ServingConfig(**args.serving))


def ingress_app(args: IngressAppArgs) -> Application:
    serving = ServingConfig(**args.serving)
    if serving.store == EMBEDDED and args.shop_dir:
        create_store(args.shop_dir)  # a named actor: every ingress replica finds it by name
    if args.shop_dir:  # `/admin/rollout/*` works after a `serve deploy` alone, as after `recsys serve`
        start_controller(serving, index_config(args.index), RolloutConfig(**args.rollout),
                         shop_gate_users(args.shop_dir))
    return build_ingress_app(args.versions, args.policy, serving, args.admin_token_sha256)
