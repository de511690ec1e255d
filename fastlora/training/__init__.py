"""Layer 3, model-level training features installed by ``fastlora.patch``: the fused linear cross-entropy, offloaded
checkpoints, the tiled MLP and chunked RMSNorm (:mod:`.long_context` installs the long-context ones).

Usage: ``fastlora.patch(model, fused_cross_entropy=True, offload_checkpoints=True, tiled_mlp=True)``
"""
