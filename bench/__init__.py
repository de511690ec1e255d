"""The benchmark suite behind ``fastlora bench``: LoRA layers, training and memory, PEFT vs fastlora.

Modules, bottom up: :mod:`.models` (shapes, model builders), :mod:`.timing` (timers, peaks, peak memory),
:mod:`.environment` (machine and versions), :mod:`.layers`, :mod:`.training` (the suites), :mod:`.results`
(the JSON schema), :mod:`.report` and :mod:`.plots` (outputs), :mod:`.runner` (runs the suites it is asked for).

Usage::

    fastlora bench --device cpu --suite all --out bench-out
"""
