"""Billing models as pure code: a plan and usage go in, decisions and charges come out.

Nothing here does I/O or reads a clock: every function takes the instant it reasons
about as an argument, so each worked example of BILLING_MODELS.md is a plain,
fast, deterministic test.
"""
