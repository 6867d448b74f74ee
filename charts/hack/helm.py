#!/usr/bin/env python3
"""Offline Helm for this repository, through PyPI's helm-python-sdk (Helm v4 as a library).

  helm.py lint     CHART [-f VALUES] [--strict]  JSON lint report on stdout
  helm.py validate CHART -f VALUES               values.schema.json check
  helm.py render   CHART [-f VALUES] [--name N] [--namespace NS] [--crds]
                                                 rendered manifests (multi-document YAML)

VALUES is a JSON (or YAML) file, or '-' for stdin. The tests in
tests/tests/packaging.rs create the venv (~/.cache/finetune-operator/venv-helm) and call this;
`manifests/default/finetune-operator.yaml` is
  helm.py render charts/finetune-operator --name finetune-operator --namespace finetune-system
"""
import argparse
import json
import sys

import helm_python
import helm_python.errors


def load_values(path):
    if not path:
        return None
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return helm_python.values_from_yaml(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["lint", "render", "validate"])
    ap.add_argument("chart")
    ap.add_argument("--values", "-f", help="values file (JSON or YAML), - for stdin")
    ap.add_argument("--name", default="finetune-operator")
    ap.add_argument("--namespace", default="finetune-system")
    ap.add_argument("--crds", action="store_true", help="also print the chart's crds/")
    ap.add_argument("--strict", action="store_true")
    a = ap.parse_args()
    values = load_values(a.values)
    if a.command == "lint":
        report = helm_python.lint(a.chart, values, strict=a.strict, namespace=a.namespace)
        json.dump(report, sys.stdout, indent=2)
        return 0
    chart = helm_python.Chart.load(a.chart)
    if a.command == "validate":
        chart.validate_schema(values)
        return 0
    out = []
    if a.crds:
        for crd in sorted(chart.crds, key=lambda c: c.get("name", "")):
            out.append(("crds/" + crd.get("name", ""), crd.get("data", "")))
    manifests = chart.render(values, name=a.name, namespace=a.namespace, is_install=True)
    for path in sorted(manifests):
        if path.endswith("NOTES.txt") or path.endswith(".tpl"):
            continue
        out.append((path, manifests[path]))
    for path, text in out:
        for doc in text.split("\n---"):
            body = "\n".join(l for l in doc.splitlines() if l.strip() != "---").strip("\n")
            if not [l for l in body.splitlines() if l.strip() and not l.lstrip().startswith("#")]:
                continue
            sys.stdout.write(f"---\n# Source: {path}\n{body}\n")
    if a.command == "render":
        notes = [v for k, v in manifests.items() if k.endswith("NOTES.txt")]
        if notes:
            sys.stderr.write(notes[0])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except helm_python.errors.HelmError as e:
        sys.stderr.write(f"helm: {type(e).__name__}: {e}\n")
        sys.exit(1)
