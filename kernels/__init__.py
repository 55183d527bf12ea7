"""nectar_kernels: GPU kernels for Nectar decoding (Triton) with their pure-torch references.

Nothing here imports Triton at module import time: `triton_nectar` and `fused` import it inside
the functions that launch kernels, so this package loads on CPU-only machines.
"""
