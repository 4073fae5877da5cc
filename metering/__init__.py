"""The meter: all state (accounts, usage, holds, ledger) and its atomicity.

`relay/` talks to it through the narrow async interface of `metering.meter.Meter`;
the rules come from the pure `policies/` package.
"""
