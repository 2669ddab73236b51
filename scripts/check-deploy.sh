#!/usr/bin/env bash
# Checks deploy/: installs its tools (scripts/install-deploy-tools.sh), then
#   - renders the Helm chart deploy/helm/meridian for one region (its defaults) and for
#     three regions (deploy/helm/regions/values-*.yaml, one release each), checks the
#     values against values.schema.json, and validates every rendered object against
#     the Kubernetes API schemas (kubernetes-validate, strict) and the vendored CRD
#     schemas of KEDA, cert-manager, prometheus-operator and CloudNativePG
#     (deploy/schemas/, unknown fields refused);
#   - runs `promtool check rules` on the rules and the dashboard's queries, and
#     `meridian config check` on the rendered node config;
#   - lints the Dockerfile with hadolint.
# With arguments, checks the chart with each given values file instead, and exits 1
# with a message naming the file, the key and the problem when one is broken:
#   scripts/check-deploy.sh my-values.yaml
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/install-deploy-tools.sh
export MERIDIAN_BIN="${MERIDIAN_BIN:-$ROOT/target/debug/meridian}"
if [ ! -x "$MERIDIAN_BIN" ]; then
  echo "check-deploy: building meridian (for \`meridian config check\`)"
  cargo build --locked -p meridian
fi

python3 deploy/check/check_deploy.py "$@"
if [ "$#" -eq 0 ]; then
  hadolint Dockerfile
  echo "check-deploy: Dockerfile passes hadolint"
fi
