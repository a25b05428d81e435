"""Data utilities for simmim-fast: mask generation (:mod:`simmim_fast.data.masking`)."""
