"""Tests of mailmeter.policies: the billing models, pure and fast."""
