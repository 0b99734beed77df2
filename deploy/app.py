"""Builds the Serve application from the yaml's `args:` (see deploy/app.yaml).

The same yaml runs on a machine with no GPU (CPU replicas, the built-in tiny model) and on
a GPU cluster (one GPU a replica): `replica_gpus: auto` asks for a GPU per replica when the
cluster has any.
"""

from __future__ import annotations

import ray
from ray.serve import Application

from deploy.config import AppArgs
from deploy.ingress import IceCacheIngress
from deploy.llm import IceCacheLLM


def replica_gpus(args: AppArgs) -> float:
    if args.replica_gpus != "auto":
        return float(args.replica_gpus)
    has_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1
    return 1.0 if has_gpu else 0.0


def build_app(args: AppArgs) -> Application:
    """Serve builder (`import_path: deploy.app:build_app`): Serve validates the yaml's `args:`
    into AppArgs. Replica counts and autoscaling come from the yaml's `deployments:`."""
    return build_app_with(args)


def build_app_with(args: AppArgs | dict, llm_options: dict | None = None) -> Application:
    """The app, for callers in Python: `llm_options` are extra Serve options of the model
    deployment (e.g. num_replicas), which the yaml sets in its `deployments:` block."""
    cfg = args if isinstance(args, AppArgs) else AppArgs(**(args or {}))
    gpus = replica_gpus(cfg)
    if cfg.device == "auto":
        cfg = cfg.model_copy(update={"device": "cuda" if gpus else "cpu"})
    # one secret for every replica of this deploy, so they agree on tenants' context ids
    cfg = cfg.model_copy(update={"tenant_secret": cfg.resolved_secret()})
    llm = IceCacheLLM.options(ray_actor_options={"num_cpus": cfg.replica_cpus, "num_gpus": gpus},
                              **(llm_options or {}))
    plain = cfg.model_dump()
    return IceCacheIngress.bind(llm.bind(plain, cfg.tenant_secret), plain)
