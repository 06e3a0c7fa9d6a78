"""Observability: what operators read.

metrics (the Prometheus collector and the stats line, reading what consuming
counts), http (the gevent endpoint: /metrics, /healthz, /readyz), wsgi (what it
shares with the arbiter's endpoint, without gevent), logs (logging set-up, JSON
lines, password redaction).
"""
