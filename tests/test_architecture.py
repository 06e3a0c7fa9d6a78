"""What the import-linter contracts (.importlinter) cannot see: the modules each entry
point actually loads at run time, function-level imports included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter: what this one has imported already says nothing.
PROBE = """
import json, sys
{statement}
print(json.dumps(sorted(m for m in sys.modules
                        if m.split(".")[0] in ("amqpdispatcher", "gevent", "pika"))))
"""


def loaded(statement: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", PROBE.format(statement=statement)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


@pytest.mark.parametrize("statement", [
    "import amqpdispatcher.cli",  # the arbiter's process: the console script, up to Arbiter
    "import amqpdispatcher.supervision.arbiter",
])
def test_the_arbiter_loads_neither_pika_nor_gevent(statement: str) -> None:
    modules = loaded(statement)
    assert not [m for m in modules if m.split(".")[0] in ("gevent", "pika")], modules
    assert "amqpdispatcher.supervision.arbiter" in modules


def test_the_library_api_loads_no_supervision_code() -> None:
    modules = loaded("from amqpdispatcher import Dispatcher")
    assert "amqpdispatcher.api" in modules
    assert not [m for m in modules if m.startswith(("amqpdispatcher.supervision",
                                                    "amqpdispatcher.cli"))], modules


def test_importing_the_package_loads_nothing_else() -> None:
    """setup.py reads __version__ before the dependencies are installed."""
    assert loaded("import amqpdispatcher") == ["amqpdispatcher"]


@pytest.mark.parametrize("statement", [
    "from amqpdispatcher import Dispatcher, ConfigError, SettingsError, TimeLimitExceeded, "
    "ListenError, PublishError, PublishNacked, PublishReturned, PublishTimeout",
    "from amqpdispatcher.publisher import PublishError, PublishNacked, PublishReturned, "
    "PublishTimeout",
    "from amqpdispatcher.retry import TimeLimitExceeded",
    "from amqpdispatcher.http import ListenError",
])
def test_public_imports_of_earlier_versions_keep_working(statement: str) -> None:
    loaded(statement)
