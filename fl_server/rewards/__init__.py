"""Rewards: allocation of the pool, the hash-chained ledger, statements and the payout desk."""
