"""Layer 4, the PEFT wiring: what a layer call can fuse (:mod:`.plan`), the forward put on each layer
(:mod:`.fused_forward`, :mod:`.experts`), ``patch``/``unpatch`` (:mod:`.patch`), the report and verify mode.

Usage: ``report = fastlora.patch(model)``
"""
