"""The import contracts in pyproject.toml ([tool.importlinter]) hold today and fail on a new crossing.

Each breaking case copies the real packages and the real pyproject.toml into a temporary tree, adds one
import the contracts forbid, and runs lint-imports there: the run must fail and name that import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
# The contracts' root packages, and where each lives in the repository.
PACKAGES = {
    "kit": ROOT / "kit",
    "domain": ROOT / "domain",
    "contracts": ROOT / "contracts",
    "services": ROOT / "services",
    "devtools": ROOT / "devtools",
    "bench": ROOT / "bench",
    "tests": ROOT / "tests",
    "egret_client": ROOT / "clients" / "python" / "src" / "egret_client",
}


def lint_imports(cwd: Path, *path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in path)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def copy_tree(dest: Path) -> Path:
    """The contracts' packages (Python files only) and pyproject.toml, copied under dest."""
    for name, source in PACKAGES.items():
        shutil.copytree(
            source,
            dest / name,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_repository_keeps_every_contract() -> None:
    result = lint_imports(ROOT, ROOT, ROOT / "gen", ROOT / "clients" / "python" / "src")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("new_module", "source", "broken_contract", "named_import"),
    [
        pytest.param(
            "services/portal/crossing.py",
            "from services.score import ledger\n",
            "services are independent of each other BROKEN",
            "services.portal.crossing -> services.score.ledger",
            id="a-service-imports-another",
        ),
        pytest.param(
            "services/query/reads_scores_store.py",
            "import services.score.stores.ledger\n",
            "services are independent of each other BROKEN",
            "services.query.reads_scores_store -> services.score.stores.ledger",
            id="query-reads-score-store-past-the-contract",
        ),
        pytest.param(
            "domain/uses_a_service.py",
            "import services.rules.engine\n",
            "the shared domain is pure",
            "domain.uses_a_service -> services.rules.engine",
            id="the-domain-imports-a-service",
        ),
        pytest.param(
            "contracts/uses_a_service.py",
            "import services.score.servicer\n",
            "contracts import no service BROKEN",
            "contracts.uses_a_service -> services.score.servicer",
            id="a-contract-imports-a-service",
        ),
        pytest.param(
            "kit/uses_a_service.py",
            "import services.ingest.stores.events\n",
            "kit imports no service BROKEN",
            "kit.uses_a_service -> services.ingest.stores.events",
            id="kit-imports-a-service",
        ),
    ],
)
def test_a_new_forbidden_import_breaks_its_contract(
    tmp_path: Path, new_module: str, source: str, broken_contract: str, named_import: str
) -> None:
    tree = copy_tree(tmp_path)
    (tree / new_module).write_text(f'"""Added by the test."""\n\n{source}')

    result = lint_imports(tree, tree, ROOT / "gen")

    assert result.returncode != 0, result.stdout
    assert broken_contract in result.stdout
    assert named_import in result.stdout
    assert " kept, 1 broken." in result.stdout


@pytest.mark.parametrize(
    ("added_import", "named_import"),
    [
        pytest.param("import sqlalchemy", "domain.scoring -> sqlalchemy", id="directly"),
        pytest.param("import kit.db", "kit.db -> sqlalchemy", id="through-kit"),
    ],
)
def test_a_domain_module_reaching_sqlalchemy_breaks_its_contract(
    tmp_path: Path, added_import: str, named_import: str
) -> None:
    tree = copy_tree(tmp_path)
    domain = tree / "domain" / "scoring.py"
    domain.write_text(domain.read_text() + f"\n{added_import}  # added by the test\n")

    result = lint_imports(tree, tree, ROOT / "gen")

    assert result.returncode != 0, result.stdout
    assert "the shared domain is pure: no grpc, sqlalchemy, durable-rules, contracts or service BROKEN" in (
        " ".join(result.stdout.split())
    )
    assert named_import in result.stdout
