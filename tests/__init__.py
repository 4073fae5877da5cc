"""The test suite: tests/policies/, tests/relay/, tests/metering/ and tests/mailmeter/ mirror the modules that
own their tests; the whole-relay tests (several layers over real sockets) are here."""
