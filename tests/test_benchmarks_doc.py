"""scripts/benchmarks_doc.py: docs/benchmarks.md is the bench's own figures, regenerated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "benchmarks_doc.py"
RUNS = sorted((ROOT / "docs" / "bench").glob("*.json"))


def _document(plain_p50: float, balanced_share: float) -> dict[str, Any]:
    def entry(strategy: str, share: float, p50: float) -> dict[str, Any]:
        return {
            "name": "steady", "strategy": strategy, "calls": 300, "errors": 0,
            "error_codes": {}, "per_pod": {}, "max_share_over_fair": share,
            "p50_ms": p50, "p99_ms": p50 * 2, "alarm": None,
        }  # fmt: skip

    return {
        "schema": 1,
        "settings": {"calls": 300},
        "machine": {"cpus": 2},
        "scenarios": [entry("plain", 3.0, plain_p50), entry("balanced", balanced_share, 1.0)],
    }


def _render(tmp_path: Path, *documents: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    paths = []
    for i, document in enumerate(documents):
        path = tmp_path / f"run{i}.json"
        path.write_text(json.dumps(document))
        paths.append(str(path))
    return subprocess.run(
        [sys.executable, str(SCRIPT), *paths], capture_output=True, text=True, check=False
    )


def test_each_cell_is_the_median_over_runs_with_the_spread(tmp_path: Path) -> None:
    done = _render(tmp_path, _document(1.0, 1.02), _document(3.0, 1.10), _document(2.0, 1.04))
    assert done.returncode == 0, done.stderr
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if "| `" in line}
    assert "| 3.00 |" in rows["`plain`"]  # max share 3.0 in every run: no spread shown
    assert "2.00 (1.00..3.00)" in rows["`plain`"]  # p50: median of 1, 3, 2
    assert "1.04 (1.02..1.10)" in rows["`balanced`"]
    assert "from 3 run(s)" in done.stdout


def test_a_document_of_another_schema_is_refused(tmp_path: Path) -> None:
    old = _document(1.0, 1.0)
    del old["schema"]
    done = _render(tmp_path, old)
    assert done.returncode != 0
    assert "schema" in done.stderr


def test_docs_benchmarks_md_is_generated_from_the_checked_in_runs() -> None:
    assert RUNS, "docs/bench holds no `grpc-balance bench --json` run"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, RUNS)], capture_output=True, text=True, check=True
    )
    assert (ROOT / "docs" / "benchmarks.md").read_text() == done.stdout, (
        "docs/benchmarks.md is stale: python scripts/benchmarks_doc.py docs/bench/*.json"
        " > docs/benchmarks.md"
    )


def test_a_variant_has_a_row_of_its_own(tmp_path: Path) -> None:
    """``defaults`` runs the observed channel twice, once with Rebalance: two rows, not one."""
    document = _document(1.0, 1.0)
    document["scenarios"] = [
        {"name": "defaults", "strategy": "interceptors", "max_share_over_fair": 3.0,
         "alarm_call": 29},
        {"name": "defaults", "strategy": "interceptors", "variant": "rebalance",
         "max_share_over_fair": 1.3, "alarm_call": 31, "rebalanced_call": 40},
    ]  # fmt: skip
    done = _render(tmp_path, document)
    assert done.returncode == 0, done.stderr
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if "| `" in line}
    assert rows["`interceptors`"].endswith("| 29 | - | 3.00 |")
    assert rows["`interceptors (rebalance)`"].endswith("| 31 | 40 | 1.30 |")
