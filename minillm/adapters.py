"""LoRA students and adapter folders, through ``peft`` (``student.peft``; the config section is
:class:`minillm.adapter_config.PeftConfig`).

The adapter is injected into the loaded HF model in place (``peft.inject_adapter_in_model``): the student stays
the same ``*ForCausalLM`` object, with ``lora_A``/``lora_B`` beside each targeted layer's frozen ``base_layer``.
So everything that reaches into the model (``get_output_embeddings`` for the chunked losses and the fused head,
``model.model`` for the fast engine's static-cache decoding, the bf16 sampling copy, DeepSpeed engines) sees the
model it always saw, and every forward through it applies the adapter. Only adapter parameters (and
``modules_to_save``) require gradients, so the optimizer (``minillm.optim``, which takes requires_grad
parameters) holds state for them alone.

Outputs: :func:`save_adapter` writes a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``,
loadable by ``peft.PeftModel.from_pretrained``); :func:`merged_state_dict` is the model with the adapter merged
into its weights under the base model's own parameter names, for ``save_pretrained`` folders that
``AutoModelForCausalLM`` loads without peft. :func:`merge_adapter_folder` is the loader side (teachers, eval).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import ConfigError
from .errors import UserError
from .tracking import get_logger

if TYPE_CHECKING:  # pragma: no cover
    from .adapter_config import PeftConfig

log = get_logger()

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # peft's name for a model's only adapter
# peft's adapter files name parameters as a PeftModel does: base_model (the tuner) . model (the HF model) . ...
PEFT_PREFIX = "base_model.model."
# The parameter names of the model before the adapter went in: what merged_state_dict must give back.
_BASE_KEYS = "_minillm_base_state_keys"


def require_peft():
    """The ``peft`` module, or a one-line error saying how to install it."""
    try:
        import peft
    except ImportError as e:
        raise UserError("student.peft.method=lora (and adapter folders as model paths) need the `peft` library: "
                        "pip install 'minillm-distill[peft]' (or pip install peft)") from e
    return peft


# ------------------------------------------------------------------------------------------- wrapping
def _module_names(model: torch.nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list entry: the module's full name, or its last dotted components."""
    return name == target or name.endswith("." + target)


def _leaf_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the modules that hold weights directly (what target_modules entries name)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if name and any(True for _ in module.parameters(recurse=False))}
    return sorted(names)


def check_module_names(model: torch.nn.Module, peft_cfg: "PeftConfig", key: str = "student.peft") -> None:
    """Fail naming the key and the module names that exist when ``target_modules`` or ``modules_to_save`` name a
    module the model does not have (peft would say only that nothing matched, or train less than asked)."""
    names = _module_names(model)
    for field_name, wanted in (("target_modules", peft_cfg.target_modules or []),
                               ("modules_to_save", peft_cfg.modules_to_save)):
        unknown = [t for t in wanted if t != "all-linear" and not any(_matches(n, t) for n in names)]
        if unknown:
            raise ConfigError(f"`{key}.{field_name}`: {unknown} match no module of {type(model).__name__}; its "
                              f"module names are {_leaf_names(model)} (or a dotted suffix such as "
                              "self_attn.q_proj)")


def lora_config(peft_cfg: "PeftConfig", base_path: str, revision: str | None = None):
    """The ``peft.LoraConfig`` of ``student.peft``; ``base_path`` is recorded in the adapter's config (absolute
    when it is a local folder, so the adapter loads from any working directory)."""
    peft = require_peft()
    local = Path(base_path).expanduser()
    targets = peft_cfg.target_modules
    return peft.LoraConfig(
        r=peft_cfg.r, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout, use_rslora=peft_cfg.use_rslora,
        target_modules="all-linear" if targets == ["all-linear"] else (list(targets) if targets else None),
        modules_to_save=list(peft_cfg.modules_to_save) or None, bias="none", task_type="CAUSAL_LM",
        base_model_name_or_path=str(local.resolve()) if local.is_dir() else base_path, revision=revision)


def add_adapter(model: torch.nn.Module, peft_cfg: "PeftConfig", base_path: str, *, seed: int,
                revision: str | None = None) -> torch.nn.Module:
    """Inject a LoRA adapter into ``model`` in place and return it; only adapter parameters (and
    ``modules_to_save``) keep ``requires_grad``.

    The adapter's random initialisation draws from a generator seeded with ``seed`` alone, outside the global RNG
    stream: every rank of a DeepSpeed run (seeded ``seed + rank``) and the local run start from the same adapter,
    and a LoRA run's data order and sampling draws are those of the same run without LoRA.
    """
    peft = require_peft()
    check_module_names(model, peft_cfg)
    config = lora_config(peft_cfg, base_path, revision)
    base_keys = list(model.state_dict().keys())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
        except ValueError as e:  # e.g. a target that is not a layer type LoRA supports (a whole decoder block)
            raise ConfigError(f"`student.peft`: peft cannot add this adapter to {type(model).__name__}: "
                              f"{str(e).strip().splitlines()[0]}") from e
    # a plain attribute (a list, not a module): deepcopies (the bf16 sampling copy) carry it along harmlessly
    model.__dict__[_BASE_KEYS] = base_keys
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    targets = config.target_modules  # peft turns lists (and its per-architecture default) into a set
    targets = targets if isinstance(targets, str) else sorted(targets)
    log.info("student.peft: LoRA r=%d alpha=%g on %s: %s trainable parameters of %s (%.2f%%)", peft_cfg.r,
             peft_cfg.alpha, targets, f"{trainable:,}", f"{total:,}", 100.0 * trainable / max(total, 1))
    return model


def is_adapted(model: torch.nn.Module) -> bool:
    """Whether ``model`` carries an adapter injected by :func:`add_adapter`."""
    return _BASE_KEYS in getattr(model, "__dict__", {})


# ------------------------------------------------------------------------------------------- saving
@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` with its adapter merged in, under the base model's parameter names: each
    adapted layer's weight is ``base + peft's get_delta_weight`` (what ``merge_and_unload`` computes), a
    ``modules_to_save`` module contributes its trained copy. The model itself is left untouched (merging in place
    and unmerging again would not give the weights back bit for bit, and training continues after best/ saves).
    Under ZeRO-3 call it inside ``strategy.gathered``."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    wrappers = {name: m for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    merged: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner = next((n for n in (*layers, *wrappers) if key.startswith(n + ".")), None)
        if owner is None:
            merged[key] = value
            continue
        rest = key[len(owner) + 1:]
        if owner in layers:
            if not rest.startswith("base_layer."):
                continue  # lora_A / lora_B / dropout state: folded into the weight below
            name = rest[len("base_layer."):]
            if name == "weight":
                layer = layers[owner]
                for adapter in layer.active_adapters:
                    value = value + layer.get_delta_weight(adapter).to(value.dtype)
            merged[f"{owner}.{name}"] = value
        elif rest.startswith(f"modules_to_save.{ADAPTER_NAME}."):
            merged[f"{owner}.{rest[len(f'modules_to_save.{ADAPTER_NAME}.'):]}"] = value
        # original_module.*: the frozen original of a modules_to_save module, replaced by its trained copy
    expected = model.__dict__.get(_BASE_KEYS)
    if expected is not None and set(merged) != set(expected):
        extra, missing = sorted(set(merged) - set(expected)), sorted(set(expected) - set(merged))
        raise RuntimeError(f"minillm.adapters: merging the adapter gave other parameter names than the base model "
                           f"has (extra {extra[:3]}, missing {missing[:3]}); this adapter layout is not supported")
    return merged


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's parameters (and ``modules_to_save`` copies) as peft saves them."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    return {PEFT_PREFIX + k: v.detach().contiguous() for k, v in state.items()}


def save_adapter(model: torch.nn.Module, directory: str | Path, tokenizer=None) -> None:
    """A peft adapter folder (what ``PeftModel.save_pretrained`` writes), plus the tokenizer when given, so the
    folder alone serves ``minillm-eval --model``. Call on one rank (under ZeRO-3 inside ``strategy.gathered``)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.peft_config[ADAPTER_NAME])
    config.inference_mode = True  # as PeftModel.save_pretrained records it
    config.save_pretrained(str(directory))
    save_file(adapter_state_dict(model), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def save_merged(model: torch.nn.Module, directory: str | Path, tokenizer=None) -> None:
    """``directory``: the merged model as an HF folder (``AutoModelForCausalLM`` loads it without peft), and
    ``directory/adapter/``: the adapter alone. One rank; under ZeRO-3 inside ``strategy.gathered``."""
    directory = Path(directory)
    model.save_pretrained(directory, state_dict=merged_state_dict(model), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    save_adapter(model, directory / "adapter", tokenizer)


def save_model_folder(model: torch.nn.Module, directory: str | Path, tokenizer=None) -> None:
    """An HF folder of ``model`` (best/, final/): merged with ``adapter/`` beside it when the model carries an
    adapter, else plain ``save_pretrained``. One rank; under ZeRO-3 inside ``strategy.gathered``."""
    if is_adapted(model):
        save_merged(model, directory, tokenizer)
        return
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


@torch.no_grad()
def load_adapter_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Put the adapter saved by :func:`save_adapter` into ``model`` (which carries the same adapter), exactly;
    fail when any adapter parameter of the model is not in the folder or the folder holds others."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {ADAPTER_WEIGHTS}; was this checkpoint written without "
                                "student.peft?")
    device = next(model.parameters()).device
    state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v
             for k, v in load_file(str(path), device=str(device)).items()}
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(result.missing_keys) & trainable)
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{directory}: the saved adapter does not match the student's (missing {missing[:3]}, "
                           f"unexpected {list(result.unexpected_keys)[:3]}); resume with the run's own "
                           "student.peft settings")


# ------------------------------------------------------------------------------------------- loading
def adapter_base_path(path: str) -> str | None:
    """The base model of an adapter folder (``adapter_config.json``'s ``base_model_name_or_path``); None when
    ``path`` is not an adapter folder."""
    config = Path(path).expanduser() / ADAPTER_CONFIG
    if not config.is_file():
        return None
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{config}: unreadable adapter config: {e}") from e
    if not base:
        raise UserError(f"{config}: the adapter does not name its base model (base_model_name_or_path); merge it "
                        "yourself or add the field")
    return base


@torch.no_grad()
def merge_adapter_folder(base: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """``base`` with the adapter folder ``path`` merged into its weights: a plain HF model (no peft layers)."""
    peft = require_peft()
    try:
        wrapped = peft.PeftModel.from_pretrained(base, str(path), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot apply the adapter folder `{path}` to its base model: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
    return wrapped.merge_and_unload()
