"""The state store: snapshot, history, leases, and the engine that opens it."""
