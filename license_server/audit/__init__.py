"""The audit trail: one hash-chained JSON line per call, written before the call is answered."""
