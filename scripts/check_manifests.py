"""Checks the operator's install manifests; see scripts/check-manifests."""

import argparse
import copy
import subprocess
import sys
import tempfile
from pathlib import Path

import helm_python
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "parley-operator"
CRD = ROOT / "crds" / "chatclusters.parley.dev.yaml"
PLAIN = ROOT / "deploy" / "parley-operator.yaml"
EXAMPLE = ROOT / "examples" / "chatcluster.yaml"
NAMESPACE = "parley-system"
# The Kubernetes the operator's types are built against (k8s-openapi's
# v1_33), and the newest the checker knows.
KUBE_VERSIONS = ["1.33.0", "1.37.0"]

HEADER = """\
# The Parley operator, for `kubectl apply --server-side -f`: the ChatCluster
# CRD, the parley-system namespace, RBAC and the operator Deployment.
# Generated from charts/parley-operator (default values) by
# `scripts/check-manifests --write`; CI fails when it differs.
"""


def fail(msg):
    print(f"check-manifests: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def render(values):
    with helm_python.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name="parley-operator", namespace=NAMESPACE, is_install=True)
    docs = []
    for path in sorted(out):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(out[path]):
            if doc:
                docs.append(doc)
    return docs


def lint():
    for kube in KUBE_VERSIONS:
        report = helm_python.lint(str(CHART), strict=True, namespace=NAMESPACE, kube_version=f"v{kube}")
        bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
        if bad or report.get("errors"):
            fail(f"helm lint (kube {kube}): {bad or report['errors']}")
    print("helm lint --strict: clean")


# Helm's install order: what others need comes first.
KIND_ORDER = ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Service", "Deployment"]


def plain_install():
    crd = CRD.read_text()
    docs = render({"createNamespace": True})
    docs.sort(key=lambda d: KIND_ORDER.index(d["kind"]) if d["kind"] in KIND_ORDER else len(KIND_ORDER))
    body = "".join("---\n" + yaml.safe_dump(d, sort_keys=False) for d in docs)
    return HEADER + crd + body


def validate(files):
    for kube in KUBE_VERSIONS:
        r = subprocess.run(
            ["kubernetes-validate", "--strict", "--quiet", "-k", kube, *map(str, files)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            fail(f"kubernetes-validate --strict -k {kube}:\n{r.stdout}{r.stderr}")
    print(f"kubernetes-validate --strict ({', '.join(KUBE_VERSIONS)}): {len(files)} files valid")


def crd_schema():
    crd = yaml.safe_load(CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def check_example():
    schema = crd_schema()
    example = yaml.safe_load(EXAMPLE.read_text())
    jsonschema.validate(example, schema)
    # The check must be able to fail: a wrong type and an unknown field.
    for broken, why in [
        ({"gateway": {"minReplicas": "two"}}, "a string for an integer"),
        ({"gateway": {"maxReplicas": 0}}, "below the minimum"),
        ({"redis": {"url": 5}}, "a number for a URL"),
    ]:
        bad = copy.deepcopy(example)
        for k, v in broken.items():
            bad["spec"].setdefault(k, {}).update(v)
        try:
            jsonschema.validate(bad, schema)
        except jsonschema.ValidationError:
            continue
        fail(f"the CRD schema accepted {why}")
    print("examples/chatcluster.yaml: valid against the CRD's openAPIV3Schema")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", required=True, help="parley-operator objects output")
    ap.add_argument("--write", action="store_true", help="regenerate deploy/parley-operator.yaml")
    args = ap.parse_args()

    lint()
    plain = plain_install()
    if args.write:
        PLAIN.write_text(plain)
        print(f"wrote {PLAIN.relative_to(ROOT)}")
    elif not PLAIN.exists() or PLAIN.read_text() != plain:
        fail("deploy/parley-operator.yaml differs from the chart: run scripts/check-manifests --write")
    else:
        print("deploy/parley-operator.yaml: equal to the chart's render")

    with tempfile.TemporaryDirectory() as tmp:
        files = [CRD, PLAIN, Path(args.objects)]
        for name, values in [
            ("default", {}),
            ("one-namespace", {"watchNamespace": "im", "replicas": 1}),
        ]:
            f = Path(tmp) / f"chart-{name}.yaml"
            f.write_text("".join("---\n" + yaml.safe_dump(d) for d in render(values)))
            files.append(f)
        validate(files)
    check_example()


if __name__ == "__main__":
    main()
