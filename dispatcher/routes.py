"""The route table: which carrier takes a message, and which one next when it is down.

Routes match by channel and destination prefix (longest prefix wins); a route
naming an account is an override for that account and comes before every
shared route. Every matching route is a candidate, in that order, so when all
connections of the first are down the next one takes the traffic (failover).
Failover is about connections; channel fallback (rcs -> sms) is a separate,
per-recipient decision made on what the provider answers.
"""

from __future__ import annotations

from collections.abc import Sequence

from dispatcher.channels.smpp.config import Route


class RouteTable:
    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = list(routes)

    def candidates(self, *, channel: str, to: str, account_id: str | None) -> list[Route]:
        """Matching routes, best first; one carrier appears once."""
        matching = [
            (i, r)
            for i, r in enumerate(self.routes)
            if r.channel == channel
            and to.startswith(r.prefix)
            and (r.account is None or r.account == account_id)
        ]
        matching.sort(key=lambda ir: (ir[1].account is None, -len(ir[1].prefix), ir[0]))
        seen: set[str] = set()
        out = []
        for _, route in matching:
            if route.carrier not in seen:
                seen.add(route.carrier)
                out.append(route)
        return out

    def rows(self) -> list[dict[str, str]]:
        """The table as the CLI prints it, in match order (overrides first)."""
        ordered = sorted(
            enumerate(self.routes),
            key=lambda ir: (ir[1].channel, ir[1].account is None, -len(ir[1].prefix), ir[0]),
        )
        return [
            {
                "channel": r.channel,
                "prefix": r.prefix or "*",
                "account": r.account or "*",
                "carrier": r.carrier,
            }
            for _, r in ordered
        ]
