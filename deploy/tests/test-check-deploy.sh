#!/usr/bin/env bash
# Asserts that scripts/check-deploy.sh refuses broken values files with a message that
# names the problem, and that its validators refuse broken objects (--self-test).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
pass=0
fail=0

expect_failure() { # FILE NEEDLE
  local out rc=0
  out="$(bash scripts/check-deploy.sh "$1" 2>&1)" || rc=$?
  if [ "$rc" -ne 0 ] && grep -qF -- "$2" <<<"$out"; then
    echo "ok: $1 refused: $(grep -F -- "$2" <<<"$out" | head -1 | sed 's/^ *//')"
    pass=$((pass + 1))
  else
    echo "FAIL: $1: expected a non-zero exit naming '$2', got exit $rc:" >&2
    echo "$out" >&2
    fail=$((fail + 1))
  fi
}

expect_failure deploy/tests/bad-values/negative-replicas.yaml "at '/replicaCount': minimum: got -1"
expect_failure deploy/tests/bad-values/missing-image.yaml "at '/image': missing property 'repository'"
expect_failure deploy/tests/bad-values/grace-below-drain.yaml "terminationGracePeriodSeconds (30) must be above drainTimeoutSeconds (60)"
expect_failure deploy/tests/bad-values/unknown-key.yaml "replicas"
expect_failure deploy/tests/bad-values/no-such-file.yaml "no such values file"

# A good values file passes.
if bash scripts/check-deploy.sh deploy/helm/regions/values-us.yaml >/dev/null 2>&1; then
  echo "ok: values-us.yaml accepted"; pass=$((pass + 1))
else
  echo "FAIL: values-us.yaml refused" >&2; fail=$((fail + 1))
fi
# The validators refuse broken objects.
if out="$(python3 deploy/check/check_deploy.py --self-test 2>&1)"; then
  echo "ok: validators refuse broken objects ($out)" | tr -s ' '; pass=$((pass + 1))
else
  echo "FAIL: $out" >&2; fail=$((fail + 1))
fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
