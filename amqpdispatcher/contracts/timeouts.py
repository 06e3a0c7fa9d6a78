"""Bounds shared by several parts (each part keeps the ones only it uses)."""

from __future__ import annotations

# Closing a connection (consuming, publishing, --check's): how long to wait for the
# broker's close-ok before dropping the socket.
CLOSE_TIMEOUT = 5.0
# A fast stop: how long to wait for greenlets killed in user code.
KILL_TIMEOUT = 5.0
# A reload (SIGHUP) whose new generation, or new set of workers under --processes, has
# not consumed this long after it started is cancelled, and the running one carries on.
RELOAD_TIMEOUT = 120.0
# A stop takes at most drain_timeout plus CLOSE_TIMEOUT and KILL_TIMEOUT: a worker
# whose arbiter is gone gives it drain_timeout + this before it exits anyway
# (supervision/link.py's watchdog).
WATCHDOG_MARGIN = 10.0
