"""GPU kernels (Triton). Imported only where Triton is installed; each has a float32 reference in Python."""
