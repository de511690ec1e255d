"""Layer 2, the autograd functions and layer graphs: the fused LoRA linear (:mod:`.lora`), DoRA (:mod:`.dora`), the
per-call choice of a layer's graph (:mod:`.graph`) and NF4 weights read from bitsandbytes (:mod:`.nf4_weight`).

Usage: ``y = lora.lora_linear(x, base, adapters, "cpp")``
"""
