"""The docs' generated parts match the code they are generated from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import docs  # noqa: E402
from amqpdispatcher.contracts.exits import STATUSES, markdown_table  # noqa: E402


def test_readme_exit_statuses_are_generated_from_the_contracts() -> None:
    text = docs.README.read_text(encoding="utf-8")
    assert docs.generated(text) == text, "run .venv/bin/python scripts/docs.py"
    assert markdown_table() in text
    for status in STATUSES:
        assert f"| {status.status} | {status.meaning} |" in text


def test_check_mode_fails_on_an_out_of_date_part(tmp_path: Path) -> None:
    text = docs.README.read_text(encoding="utf-8")
    stale = text.replace(markdown_table(), markdown_table().replace("| 2 |", "| 9 |"))
    assert docs.generated(stale) == text  # made anew from the code
    copy = tmp_path / "README.md"
    copy.write_text(stale, encoding="utf-8")
    script = [sys.executable, str(REPO / "scripts" / "docs.py")]
    result = subprocess.run([*script, "--check", str(copy)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert "README.md: a generated part is out of date" in result.stderr
    assert subprocess.run([*script, str(copy)], timeout=60).returncode == 0
    assert copy.read_text(encoding="utf-8") == text
