"""Layer 0, format facts: how bitsandbytes stores NF4 weights and how fastlora's dropout masks are hashed, read
alike by the Triton kernels, the C++ sources and the backends. Nothing here imports the rest of fastlora.

Usage: ``from fastlora.formats.nf4 import nf4_table``
"""
