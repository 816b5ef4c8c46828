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
from deployments.store import EMBEDDED, create_store


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
    # with the embedded store: the shop folder its actor seeds itself from (created here unless it runs)
    shop_dir: str | None = None


def version_app(args: VersionAppArgs) -> Application:
    return build_version_app(args.bundle, args.version, ServingConfig(**args.serving))


def ingress_app(args: IngressAppArgs) -> Application:
    serving = ServingConfig(**args.serving)
    if serving.store == EMBEDDED and args.shop_dir:
        create_store(args.shop_dir)  # a named actor: every ingress replica finds it by name
    return build_ingress_app(args.versions, args.policy, serving, args.admin_token_sha256)
