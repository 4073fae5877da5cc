"""Billing models as pure code: a plan and usage go in, decisions and charges come out.

Nothing here does I/O or reads a clock: every function takes the instant it reasons
about as an argument, so each worked example of docs/billing-models.md is a
plain, fast, deterministic test.

Modules, from the bottom up:
  currency    the billing currency: ISO 4217 code, minor units, symbol
  money       integer micros, parsing, half-up rounding to the minor unit, display
  periods     calendar months in a time zone, subscription anniversaries
  pricing     unit prices (flat, graduated, volume, per block): cost and its inverse
  parts       result prices, in-period charges, funding, invoicing
  plans       Plan = a combination of parts; parse_plan with key-naming errors
  history     what earlier in a period fixed some prices (a limit raised, a plan changed)
  account     Standing (account facts) and Usage (period counts and history)
  limits      overrides in force; the "decrease applies at period end" rule
  usage_cost  priced usage (prices fixed when sent) and the exposure of held emails
  charges     charges_due: the complete, stable list of in-period charges
  decision    admit / headroom / blocking_refusal: caps as counts
  lease       admit_lease: a node's block of the allowance (several nodes, one meter)
  invoice     close_period: the closing invoice, rounded per line, each plan's part shown
  results     a delivery result's billing category and sub-type, from what its reply means
  prepaid     model B's monthly payment (credit) and an ended period's claim on the balance
  dashboard   usage screen (model D) and usage alerts (model E)
  changes     a limit change and a plan change (upgrade at once, downgrade at period end)
  preview     one simulated period for `mailmeter plan preview`, with a script of events
"""

from mailmeter.policies.account import Standing, Usage
from mailmeter.policies.changes import (
    LimitOutcome,
    PlanChange,
    PlanChangeRefused,
    PlanSwitch,
    change_limit,
    is_upgrade,
    switch_plan,
    without_own_limits,
)
from mailmeter.policies.charges import Charge, charge_count, charged_total, charges_due, unbilled
from mailmeter.policies.dashboard import UsageAlert, UsageScreen, usage_alerts_due, usage_screen
from mailmeter.policies.decision import Admission, Cap, Refusal, admit, blocking_refusal, caps, headroom
from mailmeter.policies.history import History, PartPricing, PlanPart
from mailmeter.policies.invoice import Invoice, InvoiceLine, close_period
from mailmeter.policies.lease import admit_lease, lease_block
from mailmeter.policies.limits import LimitChange, limit_in_effect
from mailmeter.policies.plans import Plan, PlanError, parse_plan, parse_plans
from mailmeter.policies.prepaid import PaymentChange, monthly_credit, monthly_payment, unsettled_usage
from mailmeter.policies.preview import AppliedEvent, Preview, RefusedRun, ScriptEvent, TimedCharge, preview
from mailmeter.policies.usage_cost import exposure, priced_usage

__all__ = [
    "Admission",
    "AppliedEvent",
    "Cap",
    "Charge",
    "History",
    "Invoice",
    "InvoiceLine",
    "LimitChange",
    "LimitOutcome",
    "PartPricing",
    "PaymentChange",
    "Plan",
    "PlanChange",
    "PlanChangeRefused",
    "PlanError",
    "PlanPart",
    "PlanSwitch",
    "Preview",
    "RefusedRun",
    "Refusal",
    "ScriptEvent",
    "Standing",
    "TimedCharge",
    "Usage",
    "UsageAlert",
    "UsageScreen",
    "admit",
    "admit_lease",
    "blocking_refusal",
    "caps",
    "change_limit",
    "charge_count",
    "charged_total",
    "charges_due",
    "close_period",
    "exposure",
    "headroom",
    "is_upgrade",
    "lease_block",
    "limit_in_effect",
    "monthly_credit",
    "monthly_payment",
    "parse_plan",
    "parse_plans",
    "preview",
    "priced_usage",
    "switch_plan",
    "unbilled",
    "unsettled_usage",
    "usage_alerts_due",
    "usage_screen",
    "without_own_limits",
]
