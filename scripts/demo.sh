#!/usr/bin/env bash
# One command: set everything up, start a private broker, run amqp-dispatcher on
# amqp-dispatcher-config.yml, publish a few demo messages and show them consumed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/demo.py "$@"
