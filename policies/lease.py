"""How many emails a relay node may borrow at once for an account (allowance leasing).

With several nodes on one shared meter, every reserve on the shared database
serializes on the account's row. A node instead borrows a block of the account's
remaining allowance in one decision (a lease), answers its sessions' reserves from
it locally, and gives back what it did not use. The lease is an ordinary hold: the
meter admits it with the same `admit`, so whatever the account may not spend, no
node can borrow.

The block shrinks as the allowance runs out (at most a LEASE_SHARE-th of the room
left after the request), so that near the end of an allowance the nodes hold little
of it idle and the last emails go to whichever node's sessions ask for them.
"""

from __future__ import annotations

from mailmeter.policies.account import Standing, Usage
from mailmeter.policies.decision import Admission, admit, headroom
from mailmeter.policies.plan import Plan

LEASE_SHARE = 8


def lease_block(room: int | None, requested: int, block: int) -> int:
    """The emails to borrow beyond `requested`: `block`, capped by a share of the room left."""
    if block <= 0:
        return 0
    if room is None:
        return block
    return min(block, max(room - requested, 0) // LEASE_SHARE)


def admit_lease(plan: Plan, standing: Standing, usage: Usage, requested: int, block: int) -> Admission:
    """Admit `requested` emails plus a lease block, in one decision.

    `granted` is everything admitted (the request first, then the block); `refusal`
    concerns the request only: a block cut short by the room left is not a refusal.
    """
    if requested < 0:
        raise ValueError("requested must be >= 0")
    room, _ = headroom(plan, standing, usage)
    admission = admit(plan, standing, usage, requested + lease_block(room, requested, block))
    return Admission(
        granted=admission.granted,
        refusal=admission.refusal if admission.granted < requested else None,
        remaining=admission.remaining,
    )


__all__ = ["LEASE_SHARE", "admit_lease", "lease_block"]
