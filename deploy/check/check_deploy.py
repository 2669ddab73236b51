"""Renders deploy/helm/meridian and validates every object it produces.

Run by scripts/check-deploy.sh, which installs the tools first. Without arguments it
checks the chart with its defaults (one region) and with the three region values files
(three releases); with arguments it checks the chart with each given values file.
Exits 1 with a message naming the file, the object and the problem on the first kind
of failure it finds (all problems of that run are listed).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "deploy/helm/meridian")
REGIONS = [os.path.join(ROOT, f"deploy/helm/regions/values-{r}.yaml") for r in ("eu", "us", "ap")]
SCHEMAS = os.path.join(ROOT, "deploy/schemas")
DASHBOARD = os.path.join(ROOT, "deploy/grafana/meridian-dashboard.json")
RULES = os.path.join(CHART, "files/rules.yaml")
KUBE_VERSION = os.environ.get("KUBE_VERSION", "1.30.0")
MERIDIAN_BIN = os.environ.get("MERIDIAN_BIN", os.path.join(ROOT, "target/debug/meridian"))


class Failed(Exception):
    """A check failed; the message says where and why."""


def strict(schema: dict) -> dict:
    """A copy of a CRD schema that refuses unknown fields, as the API server's strict
    field validation does (objects with `properties` and no
    `x-kubernetes-preserve-unknown-fields` get `additionalProperties: false`)."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    # The API server checks metadata itself; the CRD schema leaves it open.
    s.setdefault("properties", {})["metadata"] = {"type": "object"}
    return s


def load_crd_schemas() -> dict:
    index = json.load(open(os.path.join(SCHEMAS, "index.json")))
    out = {}
    for e in index:
        schema = json.load(open(os.path.join(SCHEMAS, e["file"])))
        out[(e["apiVersion"], e["kind"])] = jsonschema.Draft7Validator(strict(schema))
    return out


def render(chart, values_file: str | None, release: str) -> list[dict]:
    values = {}
    if values_file:
        try:
            with open(values_file) as f:
                values = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise Failed(f"{values_file}: cannot read values: {e}")
        if not isinstance(values, dict):
            raise Failed(f"{values_file}: a values file must be a mapping")
    try:
        chart.validate_schema(values)
        manifests = chart.render(values, name=release, namespace=release, is_install=True)
    except helm.HelmError as e:
        raise Failed(f"{values_file or 'chart defaults'}: {str(e).strip()}")
    docs = []
    for path, text in sorted(manifests.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for d in yaml.safe_load_all(text):
            if d:
                d.setdefault("metadata", {}).setdefault("namespace", release)
                docs.append(d)
    return docs


def validate(docs: list[dict], crds: dict, label: str) -> list[str]:
    problems = []
    for d in docs:
        api, kind = d.get("apiVersion"), d.get("kind")
        name = f"{label}: {kind} {d.get('metadata', {}).get('name')}"
        if (api, kind) in crds:
            for err in crds[(api, kind)].iter_errors(d):
                where = "/".join(str(p) for p in err.absolute_path) or "(root)"
                problems.append(f"{name}: {where}: {err.message}")
        elif "." in (api or "").split("/")[0] and not api.startswith(
            ("apps/", "networking.k8s.io/", "policy/", "autoscaling/", "batch/", "rbac.")
        ):
            problems.append(f"{name}: no vendored schema for {api} {kind} (add it to deploy/schemas)")
        else:
            try:
                kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = "/".join(str(p) for p in e.path) or "(root)"
                problems.append(f"{name}: {where}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{name}: no Kubernetes schema: {e}")
    return problems


def promtool_rules(rules: dict, label: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(rules, f)
    try:
        r = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if r.returncode != 0:
        raise Failed(f"{label}: promtool check rules failed:\n{r.stdout}{r.stderr}")


def config_check(docs: list[dict], label: str) -> None:
    for d in docs:
        if d["kind"] == "ConfigMap" and "meridian.toml" in d.get("data", {}):
            with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
                f.write(d["data"]["meridian.toml"])
            try:
                r = subprocess.run([MERIDIAN_BIN, "config", "check", f.name], capture_output=True, text=True)
            finally:
                os.unlink(f.name)
            if r.returncode != 0:
                raise Failed(f"{label}: rendered meridian.toml fails `meridian config check`:\n{r.stdout}{r.stderr}")
            return
    raise Failed(f"{label}: no ConfigMap with meridian.toml rendered")


def check_release(chart, crds, values_file, release) -> list[dict]:
    label = f"{os.path.relpath(values_file, ROOT) if values_file else 'defaults'} ({release})"
    docs = render(chart, values_file, release)
    problems = validate(docs, crds, label)
    if problems:
        raise Failed("schema validation failed:\n  " + "\n  ".join(problems))
    kinds = sorted({d["kind"] for d in docs})
    for rule in (d for d in docs if d["kind"] == "PrometheusRule"):
        promtool_rules(rule["spec"], f"{label}: PrometheusRule")
    config_check(docs, label)
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    c = pod["containers"][0]
    if c["livenessProbe"]["httpGet"]["path"] == c["readinessProbe"]["httpGet"]["path"]:
        raise Failed(f"{label}: liveness and readiness probes must differ")
    print(f"  {label}: {len(docs)} objects valid ({', '.join(kinds)})")
    return docs


def check_dashboard() -> None:
    dash = json.load(open(DASHBOARD))
    rules = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"].replace("$region", ".*")
            rules.append({"record": f"dashboard:panel{p['id']}:{t['refId']}", "expr": expr})
    promtool_rules({"groups": [{"name": "dashboard", "rules": rules}]}, "grafana dashboard queries")
    print(f"  grafana dashboard: {len(dash['panels'])} panels, {len(rules)} queries parse")


def self_test(chart, crds) -> None:
    """The validators must refuse broken objects: an unknown field in a CRD object, a
    wrong type in a Kubernetes object, an unknown kind."""
    docs = render(chart, REGIONS[0], "meridian-selftest")
    broken = []
    for d in docs:
        d = copy.deepcopy(d)
        if d["kind"] == "ScaledObject":
            d["spec"]["minReplicas"] = 1  # the field is minReplicaCount
        elif d["kind"] == "Certificate":
            d["spec"]["dnsNames"] = "not-a-list"
        elif d["kind"] == "StatefulSet":
            d["spec"]["replicas"] = "three"
        elif d["kind"] == "Cluster":
            d["spec"]["instances"] = "3"
        else:
            continue
        broken.append(d)
    broken.append({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})
    problems = validate(broken, crds, "self-test")
    for needle in ["ScaledObject", "Certificate", "StatefulSet", "Cluster", "Widget"]:
        if not any(needle in p for p in problems):
            raise Failed(f"self-test: the validators accepted a broken {needle}: {problems}")
    print(f"  self-test: {len(problems)} problems found in {len(broken)} broken objects, as expected")


def main(argv: list[str]) -> int:
    chart = helm.Chart.load(CHART)
    crds = load_crd_schemas()
    if argv == ["--self-test"]:
        try:
            self_test(chart, crds)
        except Failed as e:
            print(f"check-deploy: FAILED: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        if argv:
            for i, vf in enumerate(argv):
                if not os.path.isfile(vf):
                    raise Failed(f"{vf}: no such values file")
                check_release(chart, crds, os.path.abspath(vf), f"meridian-check{i}")
        else:
            print("one region (chart defaults):")
            check_release(chart, crds, None, "meridian")
            print("three regions (one release each):")
            dbs = set()
            for vf in REGIONS:
                region = yaml.safe_load(open(vf))["region"]
                docs = check_release(chart, crds, vf, f"meridian-{region}")
                sts = next(d for d in docs if d["kind"] == "StatefulSet")
                env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
                secret = env["MERIDIAN_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"]
                clusters = [d["metadata"]["name"] for d in docs if d["kind"] == "Cluster"]
                if [secret] != [f"{c}-app" for c in clusters]:
                    raise Failed(f"{vf}: the nodes' database secret {secret} is not this region's CNPG cluster {clusters}")
                if env["MERIDIAN_REGION"]["value"] != region:
                    raise Failed(f"{vf}: nodes serve region {env['MERIDIAN_REGION']['value']}, not {region}")
                dbs.add((sts["metadata"]["namespace"], secret))
            if len(dbs) != len(REGIONS):
                raise Failed("regions share a database")
            promtool_rules(yaml.safe_load(open(RULES)), os.path.relpath(RULES, ROOT))
            print(f"  {os.path.relpath(RULES, ROOT)}: promtool check rules passed")
            check_dashboard()
    except Failed as e:
        print(f"check-deploy: FAILED: {e}", file=sys.stderr)
        return 1
    print("check-deploy: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
