"""The HTTP-free core, a call in and an outcome out: protocol, policy, upstream, signatures, kept answers."""
