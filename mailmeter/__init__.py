"""mailmeter: the service composition (config, CLI, admin API, wiring) around its subpackages
mailmeter.relay, mailmeter.metering and mailmeter.policies (the folders relay/, metering/ and
policies/ of the repository, installed under this name: see pyproject.toml)."""
