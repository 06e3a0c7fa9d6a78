#!/usr/bin/env bash
# One command: set everything up, lint, type-check, check the import contracts, and run
# the whole test suite against a private RabbitMQ node that the suite starts and stops
# itself.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check amqpdispatcher tests examples bench scripts
.venv/bin/mypy amqpdispatcher
.venv/bin/lint-imports --no-cache   # the architecture: .importlinter, docs/architecture.md
.venv/bin/pytest "$@"
