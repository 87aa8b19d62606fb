"""Every durable store and nothing else: the SQLite worker, kept answers, seat ledger, state folder."""
