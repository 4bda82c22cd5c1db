"""Triton kernels of transfuse, loaded by the `triton` backend (transfuse.kernels.*)."""
