"""mailmeter: the service composition (config, CLI, wiring) around relay/, metering/ and policies/."""
