"""Security: the PKI (CA, SuperLink certificate, node keys, their loaders) and signed, encrypted model artefacts."""
