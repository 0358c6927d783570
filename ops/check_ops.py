"""The Python half of ops/check.sh: schema and consistency checks of the deployment files.

Run by ops/check.sh (which also runs the compose binary, promtool and kubectl);
each subcommand prints one line per problem and exits 1 if there was any.

    python ops/check_ops.py k8s [RENDERED.yaml]   manifests vs Kubernetes + KEDA schemas,
                                                  kustomization, pipeline.toml, tiers
    python ops/check_ops.py compose RENDERED.json PROFILE
                                                  `docker compose config` output vs tiers
    python ops/check_ops.py grafana               provisioning vs dashboards
    python ops/check_ops.py env-example           .env.example holds no real secret
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = ROOT / "ops" / "k8s"
SCHEMA_DIR = K8S_DIR / "schemas"
KUBERNETES_VERSION = "1.31.0"  # the oldest Kubernetes the manifests are checked against
NOT_APPLIED = {"kustomization.yaml", "secret.example.yaml"}  # in ops/k8s, not resources
TIERS = ("critical", "high", "standard", "bulk")
CRITICAL_MIN_REPLICAS = 1  # the critical tier never scales to zero
SECRET_VARS = ("PIPELINE_API_TOKEN", "PIPELINE_FLOWER_BASIC_AUTH", "REDIS_PASSWORD",
               "RABBITMQ_PASSWORD", "GRAFANA_ADMIN_PASSWORD")
PLACEHOLDER = "change-me"  # every secret in .env.example contains it

Doc = dict[str, Any]


class Problems:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.lines.append(f"{where}: {message}")

    def exit(self, what: str) -> None:
        for line in self.lines:
            print(f"error: {line}", file=sys.stderr)
        if self.lines:
            sys.exit(1)
        print(f"ok: {what}")


def load_docs(path: Path) -> Iterator[Doc]:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc:
            yield doc


def keda_schemas() -> dict[str, Doc]:
    return {kind: json.loads((SCHEMA_DIR / f"{kind.lower()}-keda-v1alpha1.json").read_text())
            for kind in ("ScaledObject", "TriggerAuthentication")}


def validate_doc(doc: Doc, where: str, keda: dict[str, Doc], problems: Problems) -> None:
    kind, api = doc.get("kind"), doc.get("apiVersion")
    name = f"{where} {kind}/{doc.get('metadata', {}).get('name')}"
    if api == "keda.sh/v1alpha1":
        if kind not in keda:
            problems.add(name, f"no vendored KEDA schema for kind {kind!r}")
            return
        validator = jsonschema.Draft202012Validator(keda[kind])
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
            path = ".".join(str(p) for p in err.path) or "<root>"
            problems.add(name, f"{path}: {err.message}")
        return
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(p) for p in err.path) or "<root>"
        problems.add(name, f"{path}: {err.message}")
    except kubernetes_validate.SchemaNotFoundError as err:
        problems.add(name, err.message)


def check_k8s(rendered: Path | None) -> None:
    problems = Problems()
    keda = keda_schemas()
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    resources: list[str] = kustomization.get("resources", [])
    for resource in resources:
        if not (K8S_DIR / resource).is_file():
            problems.add("kustomization.yaml", f"resource {resource!r} does not exist")
    for manifest in sorted(K8S_DIR.glob("*.yaml")):
        if manifest.name not in NOT_APPLIED and manifest.name not in resources:
            problems.add("kustomization.yaml", f"{manifest.name} is not listed in resources")
    generated_files = [f for gen in kustomization.get("configMapGenerator", [])
                       for f in gen.get("files", [])]
    for name in generated_files:
        if not (K8S_DIR / name).is_file():
            problems.add("kustomization.yaml", f"configMapGenerator file {name!r} missing")

    docs: list[tuple[str, Doc]] = []
    for manifest in sorted(K8S_DIR.glob("*.yaml")):
        if manifest.name == "kustomization.yaml":
            continue
        try:
            docs += [(manifest.name, d) for d in load_docs(manifest)]
        except yaml.YAMLError as err:
            problems.add(manifest.name, f"not YAML: {err}")
    if rendered is not None:  # `kubectl kustomize` output: the ConfigMap, names, images
        docs += [("<kustomize build>", d) for d in load_docs(rendered)]
    for where, doc in docs:
        validate_doc(doc, where, keda, problems)

    applied = [(w, d) for w, d in docs if w in resources]
    check_tiers(applied, problems)
    problems.exit(f"{len(docs)} Kubernetes documents valid against Kubernetes "
                  f"{KUBERNETES_VERSION} (strict) and KEDA keda.sh/v1alpha1 schemas")


def check_tiers(docs: list[tuple[str, Doc]], problems: Problems) -> None:
    """Each tier: a worker Deployment whose grace period outlasts the tier's hard time
    limit, and a ScaledObject on that tier's own queue (critical never below 1)."""
    sys.path.insert(0, str(ROOT))
    from pipeline.config.load import load_settings

    settings = load_settings(K8S_DIR / "pipeline.toml")
    workers: dict[str, Doc] = {}
    for where, doc in docs:
        if doc.get("kind") != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            args = container.get("args", [])
            if args[:1] == ["worker"]:
                tier = args[args.index("--tier") + 1] if "--tier" in args else None
                if tier not in settings.tiers:
                    problems.add(where, f"{doc['metadata']['name']} serves unknown tier {tier!r}")
                    continue
                workers[tier] = doc
                grace = doc["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
                limit = settings.tier(tier).time_limit_s
                if grace <= limit:
                    problems.add(where, f"{doc['metadata']['name']}: terminationGracePeriod"
                                        f"Seconds {grace} is not above tier {tier}'s "
                                        f"time_limit_s {limit:g}")
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for _, d in docs
              if d.get("kind") == "ScaledObject"}
    for tier in settings.tiers:
        worker = workers.get(tier)
        if worker is None:
            problems.add("workers.yaml", f"no worker Deployment for tier {tier!r}")
            continue
        so = scaled.get(worker["metadata"]["name"])
        if so is None:
            problems.add("keda.yaml", f"no ScaledObject targets {worker['metadata']['name']}")
            continue
        lists = [t.get("metadata", {}).get("listName") for t in so["spec"].get("triggers", [])
                 if t.get("type") == "redis"]
        if lists != [settings.queue_for(tier)]:
            problems.add("keda.yaml", f"{so['metadata']['name']}: redis trigger listName {lists} "
                                      f"is not tier {tier}'s queue {settings.queue_for(tier)!r}")
        if (tier == "critical"
                and so["spec"].get("minReplicaCount", 0) < CRITICAL_MIN_REPLICAS):
            problems.add("keda.yaml", f"{so['metadata']['name']}: minReplicaCount must be >= "
                                      f"{CRITICAL_MIN_REPLICAS} (critical never scales to zero)")


def duration_s(text: str) -> float:
    """A compose duration as rendered by `config` ("1m30s", "45s") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"([\d.]+)(ms|h|m|s)", text)
    if not parts:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def check_compose(rendered: Path, profile: str) -> None:
    """The rendered compose model of one profile: a worker service per tier whose
    stop_grace_period outlasts the tier's hard time limit, the right broker URLs,
    and Redis with AOF everysec + noeviction."""
    sys.path.insert(0, str(ROOT))
    from pipeline.config.load import load_settings

    problems = Problems()
    settings = load_settings(ROOT / "pipeline" / "default.toml")
    services: dict[str, Doc] = json.loads(rendered.read_text())["services"]
    suffix = "" if profile == "redis" else f"-{profile}"
    for tier in TIERS:
        name = f"worker-{tier}{suffix}"
        service = services.get(name)
        if service is None:
            problems.add(profile, f"no service {name}")
            continue
        if service.get("command") != ["worker", "--tier", tier]:
            problems.add(name, f"command {service.get('command')} is not worker --tier {tier}")
        grace = duration_s(service.get("stop_grace_period", "10s"))
        if grace <= settings.tier(tier).time_limit_s:
            problems.add(name, f"stop_grace_period {grace:g}s is not above tier {tier}'s "
                               f"time_limit_s {settings.tier(tier).time_limit_s:g}")
        if "container_name" in service:
            problems.add(name, "container_name prevents `--scale`")
    for role in ("api", "flower", "exporter", *(f"worker-{t}" for t in TIERS)):
        env = services.get(f"{role}{suffix}", {}).get("environment", {})
        broker = str(env.get("PIPELINE_BROKER_URL", ""))
        want = "redis://" if profile == "redis" else "amqp://"
        if not broker.startswith(want):
            problems.add(f"{role}{suffix}", f"PIPELINE_BROKER_URL does not start with {want}")
        if profile == "rabbitmq" and not str(env.get("PIPELINE_STATE_URL", "")).startswith(
                "redis://"):
            problems.add(f"{role}{suffix}", "PIPELINE_STATE_URL must name the Redis")
    command = " ".join(services.get("redis", {}).get("command", []))
    for setting in ("--appendonly yes", "--appendfsync everysec",
                    "--maxmemory-policy noeviction"):
        if setting not in command:
            problems.add("redis", f"command lacks {setting!r}")
    for name, service in services.items():
        if "healthcheck" not in service:
            problems.add(name, "no healthcheck")
        if service.get("restart") not in ("unless-stopped", "always"):
            problems.add(name, "no restart policy")
    problems.exit(f"compose profile {profile}: {len(services)} services consistent")


def check_grafana() -> None:
    problems = Problems()
    provisioning = ROOT / "ops" / "grafana" / "provisioning"
    uids: set[str] = set()
    for path in sorted((provisioning / "datasources").glob("*.yml")):
        for ds in yaml.safe_load(path.read_text()).get("datasources", []):
            if not ds.get("uid"):
                problems.add(path.name, f"datasource {ds.get('name')!r} has no uid")
            uids.add(ds.get("uid", ""))
    for path in sorted((provisioning / "dashboards").glob("*.yml")):
        for provider in yaml.safe_load(path.read_text()).get("providers", []):
            if provider.get("options", {}).get("path") != "/etc/grafana/dashboards":
                problems.add(path.name, "provider path is not /etc/grafana/dashboards "
                                        "(where docker-compose.yml mounts ops/grafana/dashboards)")
    dashboards = sorted((ROOT / "ops" / "grafana" / "dashboards").glob("*.json"))
    if not dashboards:
        problems.add("ops/grafana/dashboards", "no dashboard JSON")
    for path in dashboards:
        try:
            dashboard = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            problems.add(path.name, f"not JSON: {err}")
            continue
        for uid in sorted(set(datasource_uids(dashboard))):
            if not uid.startswith("$") and uid not in uids:
                problems.add(path.name, f"datasource uid {uid!r} is not provisioned "
                                        f"(provisioned: {sorted(uids)})")
    problems.exit(f"grafana: {len(uids)} datasource(s), {len(dashboards)} dashboard(s)")


def datasource_uids(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ds = node.get("datasource")
        if isinstance(ds, dict) and isinstance(ds.get("uid"), str):
            yield ds["uid"]
        for value in node.values():
            yield from datasource_uids(value)
    elif isinstance(node, list):
        for value in node:
            yield from datasource_uids(value)


def check_env_example() -> None:
    problems = Problems()
    values: dict[str, str] = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip().strip("'\"")
    for var in SECRET_VARS:
        if var not in values:
            problems.add(".env.example", f"{var} missing")
        elif PLACEHOLDER not in values[var]:
            problems.add(".env.example", f"{var} must be a {PLACEHOLDER!r} placeholder, "
                                         "never a real secret")
    problems.exit(f".env.example: {len(SECRET_VARS)} secrets are placeholders")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    k8s = sub.add_parser("k8s")
    k8s.add_argument("rendered", nargs="?", type=Path)
    compose = sub.add_parser("compose")
    compose.add_argument("rendered", type=Path)
    compose.add_argument("profile", choices=("redis", "rabbitmq"))
    sub.add_parser("grafana")
    sub.add_parser("env-example")
    args = parser.parse_args()
    if args.what == "k8s":
        check_k8s(args.rendered)
    elif args.what == "compose":
        check_compose(args.rendered, args.profile)
    elif args.what == "grafana":
        check_grafana()
    else:
        check_env_example()


if __name__ == "__main__":
    main()
