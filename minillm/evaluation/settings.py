"""Settings of ``minillm-eval``: one dataclass, filled from defaults < a YAML file < command-line flags.

This module imports only the standard library and PyYAML (lazily), so ``minillm-eval --help`` stays fast.
The YAML file uses the flag names with underscores (or dashes) as keys, e.g.::

    model: [runs/sft/gpt2-base/best, runs/minillm/gpt2-base/best]
    name: [SFT, MiniLLM]
    data: [dolly, self_inst, vicuna, sinst, uinst]
    seeds: [10, 20, 30, 40, 50]
    teacher: runs/sft/gpt2-xl/best
    dist: true

Unknown keys and values of the wrong type fail with the file and the key.

Presets (``--preset`` / ``preset:``) name the two decoding protocols of the reference, which changed after the
paper (lmops-notes §5). Precedence: defaults < the preset < the YAML file's other keys < flags.

- ``paper`` reproduces Table 1 as published: no n-gram block (the paper-era fork's sampler discarded the
  processed scores, so its ``no_repeat_ngram_size=6`` was inert) and prompts encoded with the tokenizer's default
  special tokens (``prompt_bos``), as the pre-2024 prompt dataset did: OPT and LLaMA prompts start with BOS,
  GPT-2 and Qwen prompts are unchanged (their tokenizers add nothing by default).
- ``official-head`` reproduces the current official code: ``no_repeat_ngram_size=6`` (applied since the
  2024-09 sampler fix) and prompts without special tokens (since the 2024-02 "fix start token" change).

Without a preset the defaults are the paper's decoding with the current prompt encoding (no BOS), which is the
same as ``paper`` for GPT-2. ``dtype: auto`` (the default) is the protocol's fp16 on CUDA and fp32 on CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError

# The evaluation protocol of DESIGN §6 (lmops-notes §5).
DEFAULT_SEEDS = [10, 20, 30, 40, 50]
EVAL_SETS = ("dolly", "self_inst", "vicuna", "sinst", "uinst")
CALIBRATION_TASKS = ("sst2", "boolq")


# Named protocols (module docstring); each sets exactly these fields.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"no_repeat_ngram_size": 0, "prompt_bos": True},
    "official-head": {"no_repeat_ngram_size": 6, "prompt_bos": False},
}
DTYPES = ("auto", "fp32", "bf16", "fp16")

ENGINES = ("auto", "hf", "fast")  # minillm.evaluation.generation.resolve_engine


def engine_conflict(engine: str, *, no_repeat_ngram_size: int = 0, zero3: bool = False) -> str | None:
    """Why ``engine`` cannot sample with these settings (a message naming the flags), or None."""
    if engine not in ENGINES:
        return f"--engine must be auto, hf or fast, got {engine!r}"
    if engine == "fast" and no_repeat_ngram_size:
        return "--engine fast does not implement --no-repeat-ngram-size; use --engine hf (or auto, which picks it)"
    if engine == "fast" and zero3:
        return "--engine fast cannot run ZeRO-3 sharded models (--zero3); use --engine hf (or auto, which picks it)"
    return None


class SettingsError(UserError, ValueError):
    """A bad flag or config-file value, naming the flag/key and what to do."""


@dataclass
class EvalSettings:
    """Everything one ``minillm-eval`` call does. Field names are the flags' names with underscores."""

    model: list[str] = field(default_factory=list)       # model folders (or hub ids) to compare
    data: list[str] = field(default_factory=list)        # named sets, local files/folders or hub ids
    out: str = ""                                        # output folder
    name: list[str] = field(default_factory=list)        # display names of the models (same order)
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    max_new_tokens: int = 256
    max_prompt_length: int = 256                         # prompts are cut to their FIRST this many tokens
    batch_size: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    no_repeat_ngram_size: int = 0
    prompt_bos: bool = False                             # encode prompts with the tokenizer's default special tokens
    # paper / official-head (module docstring). resolve_settings applies its values; set directly on an
    # EvalSettings the name is only recorded.
    preset: Optional[str] = None
    num: int = -1                                        # first N records of each set (-1: all)
    template: str = "auto"
    teacher: Optional[str] = None
    dist: bool = False
    device: str = "auto"
    engine: str = "auto"                                 # auto/hf/fast (minillm.evaluation.generation.resolve_engine)
    dtype: str = "auto"                                  # auto: fp16 on CUDA (the protocol), fp32 on CPU
    cache_dir: str = ".cache/minillm"
    zero3: bool = False
    judge: bool = False
    judge_workers: int = 4
    exposure_bias: bool = False
    lm_loss: bool = False
    calibration: Optional[str] = None
    calibration_data: Optional[str] = None
    calibration_num: int = -1
    progress: bool = True

    def check(self) -> "EvalSettings":
        """Validate values that argparse cannot; returns self."""
        if not self.model:
            raise SettingsError("no model given: pass --model DIR [DIR ...] (or `model:` in --config)")
        if not self.data:
            raise SettingsError("no evaluation data given: pass --data NAME_OR_FILE [...] "
                                f"(named sets: {', '.join(EVAL_SETS)}) or `data:` in --config")
        if not self.out:
            raise SettingsError("no output folder given: pass --out OUTDIR (or `out:` in --config)")
        if self.name and len(self.name) != len(self.model):
            raise SettingsError(f"--name has {len(self.name)} values for {len(self.model)} models; give one per model")
        if len(set(self.name)) != len(self.name):
            raise SettingsError(f"--name values must be distinct, got {self.name}")
        if not self.seeds:
            raise SettingsError("--seeds needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise SettingsError(f"--seeds repeats a seed: {self.seeds}")
        for key in ("max_new_tokens", "max_prompt_length", "batch_size", "judge_workers"):
            if getattr(self, key) < 1:
                raise SettingsError(f"--{key.replace('_', '-')} must be ≥ 1, got {getattr(self, key)}")
        if self.temperature <= 0:
            raise SettingsError(f"--temperature must be > 0, got {self.temperature} (sampling is the protocol)")
        if not 0 < self.top_p <= 1:
            raise SettingsError(f"--top-p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.no_repeat_ngram_size < 0:
            raise SettingsError("--top-k and --no-repeat-ngram-size must be ≥ 0")
        if self.dtype not in DTYPES:
            raise SettingsError(f"--dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise SettingsError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise SettingsError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.dtype == "auto":
            self.dtype = resolve_dtype(self.device)
        conflict = engine_conflict(self.engine, no_repeat_ngram_size=self.no_repeat_ngram_size, zero3=self.zero3)
        if conflict:
            raise SettingsError(conflict)
        if self.template not in ("auto", "reference", "chat", "raw"):
            raise SettingsError(f"--template must be auto, reference, chat or raw, got {self.template!r}")
        if self.exposure_bias and not self.teacher:
            raise SettingsError("--exposure-bias compares the model with a teacher: also pass --teacher DIR")
        if self.calibration is not None and self.calibration not in CALIBRATION_TASKS:
            raise SettingsError(f"--calibration must be one of {', '.join(CALIBRATION_TASKS)}, "
                                f"got {self.calibration!r}")
        if self.calibration_data and not self.calibration:
            raise SettingsError("--calibration-data needs --calibration sst2|boolq")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_dtype(device: str) -> str:
    """``dtype: auto``: the evaluation protocol's fp16 where the models run on CUDA, fp32 on CPU (where fp16
    matmuls are slow or missing and the protocol's half precision is not what is being checked)."""
    if device == "cpu":
        return "fp32"
    if device == "cuda":
        return "fp16"
    import torch  # only here: --help and flag parsing stay torch-free

    return "fp16" if torch.cuda.is_available() else "fp32"


def _coerce(key: str, value: Any, source: str) -> Any:
    """``value`` converted to the type of ``default`` (lists element-wise), or a SettingsError."""
    def bad(expected: str) -> SettingsError:
        return SettingsError(f"{source}: `{key}` must be {expected}, got {value!r}")

    ftype = {f.name: f.type for f in dataclasses.fields(EvalSettings)}[key]
    if ftype.startswith("list"):
        items = value if isinstance(value, (list, tuple)) else [value]
        if ftype == "list[int]":
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
                raise bad("a list of integers")
            return [int(v) for v in items]
        return [str(v) for v in items]
    if ftype == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if ftype == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("an integer")
        return value
    if ftype == "float":
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad("a number")
        return float(value)
    if value is None and ftype.startswith("Optional"):
        return None
    if isinstance(value, (dict, list)):
        raise bad("a string")
    return str(value)


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML config file, keys normalised to field names; unknown keys raise."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise SettingsError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise SettingsError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(EvalSettings)}
    out = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        key = {"models": "model", "names": "name", "sets": "data"}.get(key, key)
        if key not in names:
            raise SettingsError(f"{path}: unknown key `{raw_key}`; valid keys: {', '.join(sorted(names))}")
        out[key] = _coerce(key, value, str(path))
    return out


def resolve_settings(flags: dict[str, Any], config: Optional[str] = None) -> EvalSettings:
    """Defaults < the YAML file ``config`` < ``flags`` (only the flags the user actually gave)."""
    from_file = read_config_file(config) if config else {}
    given = {k: v for k, v in flags.items() if k != "config"}
    preset = given.get("preset", from_file.get("preset"))
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise SettingsError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        values.update(PRESETS[preset])
    values.update(from_file)
    values.update(given)
    return EvalSettings(**values).check()
