"""Fault-injection scenarios: real node processes killed, frozen, wiped and restarted while a
seeded campaign is submitted; the invariants are checked against an independent capture sink."""
