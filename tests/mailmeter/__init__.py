"""Tests owned by one module of the composition: the CLI, the admin API, the audit trail,
start-up, service signals, metrics."""
