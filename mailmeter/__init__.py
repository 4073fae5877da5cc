"""mailmeter: the composition (config, CLI, admin API, wiring) around mailmeter.relay, mailmeter.metering
and mailmeter.policies, which live in the repository's relay/, metering/ and policies/ (pyproject.toml)."""
