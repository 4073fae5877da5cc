"""The meter (mailmeter.metering): all state (accounts, usage, holds, ledger) and its atomicity.

`relay/` talks to it through the narrow async interface of `meter.Meter`; the rules
come from the pure `policies/` package; the state lives in a store (store.py, the
interface; sqlite/ and postgres/, the two stores).
"""
