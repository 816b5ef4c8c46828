"""The KubeRay manifests under cluster/k8s validate against the KubeRay CRD schemas (vendored, v1.7.0), with no
field the schema does not know; their Serve config, and the one `recsys serve --emit-config` writes, are valid Serve
configs whose applications build through the project's typed builders."""
from __future__ import annotations

import functools
import gzip
import importlib
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

K8S = Path(__file__).resolve().parents[3] / "cluster" / "k8s"
KUBERAY = "v1.7.0"
CRDS = {"RayService": f"ray.io_rayservices.{KUBERAY}.yaml.gz", "RayJob": f"ray.io_rayjobs.{KUBERAY}.yaml.gz"}


@functools.cache
def crd_schema(kind: str) -> dict:
    crd = yaml.load(gzip.decompress((K8S / "crds" / CRDS[kind]).read_bytes()), Loader=getattr(yaml, "CSafeLoader",
                                                                                                  yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields of `value` the schema does not declare (what `kubectl apply --validate=strict` refuses)."""
    out = []
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        if props is None or schema.get("x-kubernetes-preserve-unknown-fields"):
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict):
                for k, v in value.items():
                    out += unknown_fields(v, extra, f"{path}.{k}")
            return out
        for k, v in value.items():
            if k not in props:
                out.append(f"{path}.{k}")
            else:
                out += unknown_fields(v, props[k], f"{path}.{k}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            out += unknown_fields(v, schema["items"], f"{path}[{i}]")
    return out


def check(manifest: dict) -> list[str]:
    schema = crd_schema(manifest["kind"])
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(manifest)]
    return errors + [f"{p}: not in the {manifest['kind']} schema" for p in unknown_fields(manifest, schema)]


MANIFESTS = sorted(p.name for p in K8S.glob("ray*.yaml"))


@pytest.mark.parametrize("name", MANIFESTS)
def test_each_kuberay_manifest_validates_against_its_crd(name):
    manifest = yaml.safe_load((K8S / name).read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] in CRDS
    assert check(manifest) == []
    spec = manifest["spec"].get("rayClusterConfig") or manifest["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == importlib.import_module("ray").__version__  # the image's Ray is the pinned one


def test_the_checker_catches_a_misspelt_field_and_a_wrong_type():
    manifest = yaml.safe_load((K8S / "rayjob-train.yaml").read_text())
    manifest["spec"]["rayClusterSpec"]["headGroupSpecs"] = manifest["spec"]["rayClusterSpec"].pop("headGroupSpec")
    manifest["spec"]["shutdownAfterJobFinishes"] = "yes"
    errors = check(manifest)
    assert any("headGroupSpecs: not in the RayJob schema" in e for e in errors)
    assert any("shutdownAfterJobFinishes" in e and "boolean" in e for e in errors)


def validate_serve_config(config: dict) -> None:
    from ray.serve.schema import ServeDeploySchema

    from deployments import builders

    ServeDeploySchema.model_validate(config)  # Serve's own schema of a config file
    for app in config["applications"]:
        module, name = app["import_path"].split(":")
        builder = getattr(importlib.import_module(module), name)
        model = {builders.version_app: builders.VersionAppArgs, builders.ingress_app: builders.IngressAppArgs}[builder]
        model.model_validate(app["args"])


def test_the_rayservice_serves_a_valid_serve_config_through_the_typed_builders():
    manifest = yaml.safe_load((K8S / "rayservice.yaml").read_text())
    config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    validate_serve_config(config)
    assert {a["name"] for a in config["applications"]} == {"recsys", "recsys-v1", "recsys-v2"}
    ingress = next(a for a in config["applications"] if a["name"] == "recsys")
    assert ingress["args"]["shop_dir"].startswith("/shared/")  # the ingress builder starts the rollout controller


def test_the_emitted_serve_config_is_valid_and_its_builders_build_the_applications(tmp_path):
    from pydantic import ValidationError

    from cluster.serving import serve_config
    from deployments.app import ServingConfig
    from deployments.builders import VersionAppArgs

    cfg = ServingConfig()
    config = serve_config({"v1": tmp_path / "v1"}, {"v1": 100.0}, {"max_brand_run": 2}, cfg)
    validate_serve_config(config)
    version, ingress = config["applications"]
    # built in a fresh process, as Serve's build task does: a FastAPI app that Serve's local testing mode ran in
    # this test process (tests/unit/deployments) no longer pickles
    code = ("import json, sys\n"
            "from ray.serve import Application\n"
            "from deployments.builders import IngressAppArgs, VersionAppArgs, ingress_app, version_app\n"
            "v, i = json.loads(sys.stdin.read())\n"
            "assert isinstance(version_app(VersionAppArgs.model_validate(v)), Application)\n"
            "assert isinstance(ingress_app(IngressAppArgs.model_validate(i)), Application)\n")
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps([version["args"], ingress["args"]]),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ingress["deployments"][0]["user_config"]["versions"] == {"v1": 100.0}  # what a re-deploy changes in place
    with pytest.raises(ValidationError, match="serving"):
        VersionAppArgs.model_validate({**version["args"], "serving": {"replica_cpu": 1}})


def test_the_ingress_builder_reads_the_rollout_controllers_configs_and_refuses_an_unknown_key_naming_it(tmp_path):
    from pydantic import ValidationError

    from cluster.serving import serve_config
    from deployments.app import ServingConfig
    from deployments.builders import IngressAppArgs, index_config
    from deployments.rollout.gate import RolloutConfig
    from indexing.embed import IndexConfig
    from indexing.index_types import IndexSpec

    index = IndexConfig(n_shards=3, ann=IndexSpec("hnsw", ef_search=600))
    assert index_config(index.to_dict()) == index
    config = serve_config({"v1": tmp_path / "v1"}, {"v1": 100.0}, {}, ServingConfig(), shop_dir=tmp_path, index=index,
                          rollout=RolloutConfig(gate_requests=7))
    validate_serve_config(config)
    args = IngressAppArgs.model_validate(config["applications"][-1]["args"])
    assert index_config(args.index) == index and RolloutConfig(**args.rollout).gate_requests == 7
    with pytest.raises(ValidationError, match="index"):
        IngressAppArgs.model_validate({"versions": {"v1": 1}, "index": {"shards": 2}})
    with pytest.raises(ValidationError, match="rollout"):
        IngressAppArgs.model_validate({"versions": {"v1": 1}, "rollout": {"gate": 1}})
