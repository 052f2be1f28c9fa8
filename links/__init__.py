"""Links and devices of the gateways, emulated on one machine or applied on a real gateway.

``profiles`` (link/device profiles, the simulated clock), ``shaping`` (rate by tc tbf, loss by
nftables), ``namespaces`` (a namespace and veth per gateway, addresses, byte counters,
leftovers), ``devices`` (cgroups), ``relay`` (delay and jitter), ``outages`` (links down and
up), ``wire`` (the counters handed to the ServerApp), ``iproute`` (the ``ip``/``tc`` calls).
"""
