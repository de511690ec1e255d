"""Memory of a LoRA/QLoRA training step at real scale, accounted on meta tensors (see :mod:`fastlora.memory.step`),
and the fit planner behind ``fastlora plan`` (:mod:`fastlora.memory.planner`).

Usage::

    from fastlora.memory import StepSpec, account
    account(StepSpec("llama-3-8b", method="qlora", seq=8192), "fastlora+loss").peak
"""

from fastlora.memory.step import CONTENDERS, Accounting, StepSpec, account

__all__ = ["CONTENDERS", "Accounting", "StepSpec", "account"]
