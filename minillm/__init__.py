"""minillm: distil large language models into small ones with MiniLLM (reverse-KL policy-gradient KD).

The package is importable without DeepSpeed: heavy and optional dependencies (deepspeed, wandb,
tensorboard) are imported inside the functions that need them.

    from minillm.config import load_config
    from minillm import losses
    from minillm.trainers import SFTTrainer
"""

__version__ = "0.1.0"
