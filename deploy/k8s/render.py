"""Render the Egret Helm chart offline, and keep deploy/k8s/manifests/ in step with it.

The chart (deploy/k8s/egret/) is the one hand-written deploy source. From it come:

- `deploy/k8s/manifests/`: the chart rendered with its default values, for `kubectl apply`
  users and for review; `egret.yaml` (the release), `migrations.yaml` (the pre-install /
  pre-upgrade hook Jobs, applied and awaited first), `post-install.yaml` (the post-install hook:
  the config-apply Job, applied after the release) and `tests.yaml` (the `helm test` pod);
- `deploy/k8s/egret/files/`: copies of the repository's config/ (catalogue, rule sets,
  policy, benefits) that the chart's ConfigMaps default to, since a chart cannot read outside itself.

`python -m deploy.k8s.render` rewrites both; `--check` only reports drift (exit 1).
Rendering goes through helm-python-sdk (Helm's Go SDK in-process): no helm binary, no cluster.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "deploy" / "k8s" / "egret"
MANIFESTS_DIR = REPO_ROOT / "deploy" / "k8s" / "manifests"
CI_VALUES_DIR = CHART_DIR / "ci"
CONFIG_DIR = REPO_ROOT / "config"
# The release the plain manifests are rendered as: object names are "egret-<service>".
RELEASE = "egret"
NAMESPACE = "egret"

HEADER = (
    "# Rendered from deploy/k8s/egret with its default values by `make manifests`\n"
    "# (python -m deploy.k8s.render). Do not edit: change the chart and re-render; CI fails on drift.\n"
)

Manifest = dict[str, Any]


def render(
    values: Mapping[str, Any] | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE
) -> dict[str, str]:
    """Template path → rendered text, as `helm template` would (schema-validated, hooks included)."""
    with helm.Chart.load(CHART_DIR) as chart:
        return chart.render(
            dict(values) if values is not None else None, name=release, namespace=namespace, is_install=True
        )


def objects(rendered: Mapping[str, str]) -> list[Manifest]:
    """Every Kubernetes object in a render, in template order (NOTES.txt left out)."""
    found: list[Manifest] = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        found.extend(doc for doc in yaml.safe_load_all(rendered[path]) if doc)
    return found


def hooks(manifest: Manifest) -> set[str]:
    annotations = manifest.get("metadata", {}).get("annotations") or {}
    return {h.strip() for h in str(annotations.get("helm.sh/hook", "")).split(",") if h.strip()}


def _documents(rendered: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    """(template path, document text) for every non-empty document, keeping comments."""
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        for chunk in rendered[path].split("\n---\n"):
            text = chunk.strip("\n")
            if text.startswith("---\n"):
                text = text[4:]
            if yaml.safe_load(text):
                yield path, text


def manifest_files(rendered: Mapping[str, str]) -> dict[str, str]:
    """The contents of deploy/k8s/manifests/: file name → text."""
    groups: dict[str, list[str]] = {
        "egret.yaml": [],
        "migrations.yaml": [],
        "post-install.yaml": [],
        "tests.yaml": [],
    }
    for path, text in _documents(rendered):
        kinds = hooks(yaml.safe_load(text))
        if "test" in kinds:
            group = "tests.yaml"
        elif "post-install" in kinds:
            group = "post-install.yaml"  # needs the release running: after egret.yaml
        else:
            group = "migrations.yaml" if kinds else "egret.yaml"
        groups[group].append(f"# Source: {path.split('/', 1)[1]}\n{text}\n")
    return {name: HEADER + "---\n" + "---\n".join(docs) for name, docs in groups.items()}


def chart_config_files() -> dict[Path, Path]:
    """Chart copy → repository original, for every config file the chart bundles."""
    pairs = {
        CHART_DIR / "files" / "catalogue.yaml": CONFIG_DIR / "catalogue.yaml",
        CHART_DIR / "files" / "policy.yaml": CONFIG_DIR / "policy.yaml",
        CHART_DIR / "files" / "benefits.yaml": CONFIG_DIR / "benefits.yaml",
        CHART_DIR / "files" / "purposes.yaml": CONFIG_DIR / "purposes.yaml",
    }
    for ruleset in sorted((CONFIG_DIR / "rulesets").glob("*.yaml")):
        pairs[CHART_DIR / "files" / "rulesets" / ruleset.name] = ruleset
    return pairs


def drift() -> list[str]:
    """What differs between the checked-in outputs and a fresh render; empty when in step."""
    problems = []
    for copy, original in chart_config_files().items():
        if not copy.exists() or not filecmp.cmp(copy, original, shallow=False):
            problems.append(f"{copy.relative_to(REPO_ROOT)} differs from {original.relative_to(REPO_ROOT)}")
    bundled = set((CHART_DIR / "files" / "rulesets").glob("*.yaml"))
    for extra in sorted(bundled - set(chart_config_files())):
        problems.append(f"{extra.relative_to(REPO_ROOT)} has no original in config/rulesets/")
    expected = manifest_files(render())
    for name, text in expected.items():
        path = MANIFESTS_DIR / name
        if not path.exists() or path.read_text() != text:
            problems.append(f"{path.relative_to(REPO_ROOT)} is not the chart's current default render")
    for path in sorted(MANIFESTS_DIR.glob("*.yaml")):
        if path.name not in expected:
            problems.append(f"{path.relative_to(REPO_ROOT)} is not produced by the chart")
    return problems


def write() -> None:
    """Copy config/ into the chart, then re-render the manifests (config first: they embed it)."""
    rulesets = CHART_DIR / "files" / "rulesets"
    for stale in rulesets.glob("*.yaml"):
        stale.unlink()
    for copy, original in chart_config_files().items():
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(original, copy)
    MANIFESTS_DIR.mkdir(parents=True, exist_ok=True)
    for path in MANIFESTS_DIR.glob("*.yaml"):
        path.unlink()
    for name, text in manifest_files(render()).items():
        (MANIFESTS_DIR / name).write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.k8s.render", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="report drift and exit 1 instead of writing")
    args = parser.parse_args(argv)
    if args.check:
        problems = drift()
        for problem in problems:
            print(f"drift: {problem}", file=sys.stderr)
        if problems:
            print("run `make manifests` and commit the result", file=sys.stderr)
        return 1 if problems else 0
    write()
    print(f"rendered {MANIFESTS_DIR.relative_to(REPO_ROOT)}/ from {CHART_DIR.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
