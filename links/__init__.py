"""Links and devices: profiles, the simulated clock, shaping (tbf, nftables), namespaces, relays, outages."""
