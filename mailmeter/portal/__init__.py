"""The account holder's side: server-rendered pages on their own listener (`portal:`).

An account holder signs in with the account's name and SMTP password (the same hash and
the same AUTH lockout as SMTP, relay/abuse.py) or its portal token (`mailmeter account
token NAME`), and sees its usage as its plan's model describes it (docs/billing-models.md),
a chart of the period by day, its invoices (printable, CSV), and the changes its plan lets
it make itself. Every page reads and changes only the signed-in account: no URL names an
account. Sessions live in this process's memory (a restart signs everyone out).

sessions.py: sessions and their CSRF tokens; holder.py: what one account may read and do
(over the admin service layer, audited as `portal:NAME`); chart.py: the usage chart (SVG);
views.py: the HTML; app.py: the aiohttp application and its server. docs/portal.md.
"""
