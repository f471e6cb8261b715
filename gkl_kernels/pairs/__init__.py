"""The pairwise wMSE for general pair weights: shared ``(C, C)`` and per-row ``(B, C, C)``."""
