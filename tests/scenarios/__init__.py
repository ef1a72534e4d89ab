"""End-to-end runs: real brokers, servers and edges; faults, attacks and the locked-down deployment."""
