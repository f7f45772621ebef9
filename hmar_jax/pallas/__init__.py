"""Block-sparse attention for next-scale prediction (reference and Pallas kernels)."""
