"""Triton kernels with their torch references, installed as `edgectx.kernels`.

Empty until the GPU path (decode attention over the selected context, block scoring) lands; every
kernel added here keeps a torch reference beside it and a test comparing the two.
"""
