"""Tests owned by one module of mailmeter.relay."""
