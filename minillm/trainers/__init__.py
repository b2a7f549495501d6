"""Trainers: ``SFTTrainer`` (sft, kd, seqkd) and ``MiniLLMTrainer`` (the reverse-KL policy-gradient method).

Imported lazily so that ``import minillm.trainers`` stays cheap until a trainer is used.
"""

__all__ = ["SFTTrainer", "MiniLLMTrainer"]


def __getattr__(name):
    if name == "SFTTrainer":
        from .sft import SFTTrainer

        return SFTTrainer
    if name == "MiniLLMTrainer":
        from .minillm import MiniLLMTrainer

        return MiniLLMTrainer
    raise AttributeError(name)
