"""Privacy: accounting, ledger, on-device anonymisation, audits."""
