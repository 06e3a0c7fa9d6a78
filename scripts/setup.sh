#!/usr/bin/env bash
# Set up a fresh Debian machine for the example and the tests: rabbitmq-server
# (the tests start their own private node from it), prometheus (for its promtool,
# which checks and unit-tests examples/prometheus/alerts.yml), a virtualenv in .venv,
# and this package with its test and docs dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && ! command -v rabbitmq-server >/dev/null; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q
    # The package may try to start a system-wide broker; nothing here uses it.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q rabbitmq-server
fi

if ! command -v promtool >/dev/null; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q
    # Only its promtool is used; the package may start a Prometheus server of its own,
    # which nothing here uses.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
        prometheus
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test,docs]'
