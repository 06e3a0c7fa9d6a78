#!/usr/bin/env bash
# One command: set everything up, lint, type-check, check the import contracts, build
# the docs site, and run the whole test suite against private RabbitMQ nodes that the
# suite starts and stops itself: three pytest-xdist workers, each with its own node,
# each running whole files
# (docs/development.md). Arguments go to pytest; a later -n overrides this one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check amqpdispatcher tests examples bench scripts
.venv/bin/mypy amqpdispatcher
.venv/bin/lint-imports --no-cache   # the architecture: .importlinter, docs/architecture.md
# The docs site: a broken link, a page missing from the nav or a snippet file gone fails.
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
.venv/bin/pytest -n 3 --dist loadfile -m "not cluster" "$@"
# The cluster tests start three nodes and stop them in turn: run alone, after the rest,
# their quorum elections are not starved of CPU by three other nodes (5: none selected).
.venv/bin/pytest -m cluster "$@" || [ $? -eq 5 ]
