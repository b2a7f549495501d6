"""Loading students, teachers and tokenizers; teacher/student vocabulary checks; tiny test models.

Everything loads through stock ``transformers`` with ``trust_remote_code`` off unless the config turns it on,
and weights come from safetensors when the folder has them (``use_safetensors`` is left to transformers, which
prefers them; ``.bin`` files are loaded with ``weights_only`` by transformers itself).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .adapters import adapter_base_path
from .config import ModelConfig
from .errors import UserError
from .tracking import get_logger

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = get_logger()

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelCompatibilityError(UserError, ValueError):
    """Student and teacher cannot be distilled into each other as configured."""


def _local_problem(name: str, what: str) -> str | None:
    """Why ``name`` cannot be a model folder, when it is meant as one: a path that does not exist (absolute,
    ``./``, ``../``, ``~``, more than one ``/``, or a Windows-style separator; a hub id is ``org/name``) or a file.
    None when it exists as a folder or reads as a hub id. transformers would otherwise answer "Repo id must be in
    the form 'repo_name' or 'namespace/repo_name'", which does not say that a folder is missing."""
    path = Path(name).expanduser()
    if path.is_dir():
        return None
    if path.exists():
        return f"{what} `{name}` is a file, not a model folder (a save_pretrained output)"
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name or \
            name.endswith("/"):
        return f"{what} folder `{name}` does not exist; check the path (relative paths start at {Path.cwd()})"
    return None


def _first_line(error: BaseException) -> str:
    """transformers' messages run over several lines of advice; the first says what failed."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_tokenizer(cfg: ModelConfig) -> "PreTrainedTokenizerBase":
    """The tokenizer of ``cfg`` (``cfg.tokenizer`` or ``cfg.path``), with a pad token.

    Causal LMs often ship without a pad token; like the reference code we pad with EOS. Padding is always
    masked out (attention mask, label -100), so the choice only matters for what padded slots contain.
    """
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.path
    base = adapter_base_path(name) if not cfg.tokenizer else None
    if base is not None and not (Path(name).expanduser() / "tokenizer_config.json").is_file():
        name = base  # an adapter folder without its own tokenizer files: its base model's tokenizer
    problem = _local_problem(name, "tokenizer" if cfg.tokenizer else "model")
    if problem:
        raise FileNotFoundError(problem)
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except (OSError, ValueError) as e:
        raise OSError(f"cannot load the tokenizer `{name}`: {_first_line(e)}. Pass a local folder (with its "
                      "tokenizer files) or set HF_HUB_OFFLINE=0 with network access.") from e
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelCompatibilityError(f"tokenizer `{name}` has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, *, trainable: bool, device: torch.device | str | None = None,
               zero3_config: dict | None = None, seed: int = 0) -> "PreTrainedModel":
    """Load a causal LM.

    ``cfg.path`` may be a peft adapter folder (``adapter_config.json``): its base model is loaded and the adapter
    merged into it, once (:func:`load_adapter_folder`). A trainable model with ``cfg.peft.method`` lora gets a
    fresh LoRA adapter injected in place (:func:`minillm.adapters.add_adapter`, initialised from ``seed``): only
    the adapter then requires gradients.

    A trainable student is loaded in fp32: its precision (``cfg.dtype``) is applied by the strategy
    (autocast locally, DeepSpeed's bf16/fp16 mode with fp32 master weights otherwise). A frozen model
    (the teacher) is loaded directly in ``cfg.dtype``, put in eval mode and has ``requires_grad`` off.

    ``zero3_config`` (``strategy.zero3_init_config(...)``: the DeepSpeed config of the engine the model is
    going to) builds the model straight into ZeRO-3 shards: transformers' ``HfDeepSpeedConfig`` makes
    ``from_pretrained`` construct it under ``deepspeed.zero.Init`` and load each tensor into its shards, so no
    rank ever holds the whole model in host RAM (every rank of a node would otherwise load a full copy).
    """
    if adapter_base_path(cfg.path) is not None:
        model = load_adapter_folder(cfg, trainable=trainable, zero3_config=zero3_config)
    else:
        model = _load_pretrained(cfg, trainable=trainable, zero3_config=zero3_config)
    if trainable:
        if cfg.peft.method != "none":
            from .adapters import add_adapter

            model = add_adapter(model, cfg.peft, cfg.path, seed=seed, revision=cfg.revision)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    if device is not None:
        model.to(device)
    return model


def load_adapter_folder(cfg: ModelConfig, *, trainable: bool, zero3_config: dict | None = None) -> "PreTrainedModel":
    """The base model named by the adapter folder ``cfg.path`` with the adapter merged in (a plain HF model).

    The base is loaded whole (not into ZeRO-3 shards: merging needs every weight; a ZeRO-3 engine partitions the
    merged model when it is prepared), so for the duration a global ZeRO-3 config (``minillm-eval --zero3``) is
    set aside."""
    import transformers.integrations.deepspeed as hf_deepspeed

    from .adapters import merge_adapter_folder

    if zero3_config is not None:
        log.info("%s is an adapter folder: its base model is loaded whole and merged, then sharded", cfg.path)
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    previous = ref() if ref is not None else None
    if previous is not None:
        hf_deepspeed.unset_hf_deepspeed_config()
    try:
        base_cfg = replace(cfg, path=adapter_base_path(cfg.path))
        # an adapter trained on a student that was itself an adapter folder: merge the chain from the bottom
        load_base = load_adapter_folder if adapter_base_path(base_cfg.path) is not None else _load_pretrained
        base = load_base(base_cfg, trainable=trainable, zero3_config=None)
        return merge_adapter_folder(base, cfg.path)
    finally:
        if previous is not None:
            hf_deepspeed.set_hf_deepspeed_config(previous)


def _load_pretrained(cfg: ModelConfig, *, trainable: bool, zero3_config: dict | None) -> "PreTrainedModel":
    """``from_pretrained`` in the dtype of its role, into ZeRO-3 shards when ``zero3_config`` is given."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if trainable else TORCH_DTYPES[cfg.dtype]
    sharded = previous = None
    if zero3_config is not None:
        import transformers.integrations.deepspeed as hf_deepspeed

        ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # a caller's own global config, restored afterwards
        previous = ref() if ref is not None else None
        # transformers keeps only a weak reference: the object must live for the duration of from_pretrained
        sharded = hf_deepspeed.HfDeepSpeedConfig(zero3_config)
    problem = _local_problem(cfg.path, "model")
    if problem:
        raise FileNotFoundError(problem)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except (OSError, ValueError) as e:
        raise OSError(f"cannot load the model `{cfg.path}`: {_first_line(e)}. Pass a local folder (a "
                      "save_pretrained output) or allow hub access.") from e
    finally:
        if sharded is not None:
            # later from_pretrained calls (another model, replicated) must not be sharded with this config
            if previous is not None:
                hf_deepspeed.set_hf_deepspeed_config(previous)
            else:
                hf_deepspeed.unset_hf_deepspeed_config()
            del sharded
    return model


def load_model_shape(cfg: ModelConfig) -> "PreTrainedModel":
    """The model's architecture on the meta device, from its config alone: no weights are read and no memory is
    taken. For the shape checks of a run that never runs the model (a teacher replaced by an offline cache)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = replace(cfg, path=adapter_base_path(cfg.path) or cfg.path)  # an adapter keeps its base model's shapes
    problem = _local_problem(cfg.path, "model")
    if problem:
        raise FileNotFoundError(problem)
    try:
        config = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except (OSError, ValueError) as e:
        raise OSError(f"cannot load the config of `{cfg.path}`: {_first_line(e)}. Pass a local folder (a "
                      "save_pretrained output) or allow hub access.") from e
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=TORCH_DTYPES[cfg.dtype],
                                                 trust_remote_code=cfg.trust_remote_code)
    return model.eval().requires_grad_(False)


def teacher_precision_advice(student_dtype: str, teacher_dtype: str, device_type: str,
                             backend: str | None = None) -> str | None:
    """A warning naming ``teacher.dtype`` and the value to set when the teacher's precision does not suit the run;
    None when there is nothing to say.

    * an fp32 teacher beside a half-precision student on a GPU (``teacher.dtype`` defaults to fp32, right for
      CPUs): twice the memory, and every teacher forward reads 4 bytes per weight where 2 would do;
    * an fp16 teacher beside a bf16 student (the shipped paper configs pin ``teacher.dtype: fp16``; the one-GPU
      setup overrides only ``student.dtype=bf16``): on the local backend the teacher runs inside the student's
      bf16 autocast, which recasts its fp16 weights to bf16 on every forward, dropping 3 mantissa bits (any
      device); under DeepSpeed it runs in fp16, whose range (65504) activations of bf16-trained models exceed;
    * a bf16 teacher beside an fp16 student: fp16 runs target GPUs without bf16 (V100), and a bf16 teacher keeps
      8 bits of mantissa where the run's fp16 keeps 11.

    ``backend`` (``strategy.backend``) only sharpens the fp16-teacher message; unknown, both backends are named.
    """
    if teacher_dtype == "fp16" and student_dtype == "bf16":
        local = ("on the local backend the teacher runs inside the student's bf16 autocast, which recasts its "
                 "fp16 weights to bf16 on every forward (losing 3 mantissa bits and reading the weights twice)")
        deepspeed = ("under DeepSpeed the teacher runs in fp16, whose range (65504) the activations of "
                     "bf16-trained models can overflow")
        why = local if backend == "local" else deepspeed if backend == "deepspeed" else f"{local}; {deepspeed}"
        return (f"teacher.dtype is fp16 while the student trains in bf16: {why}. Set teacher.dtype=bf16 "
                "(the one-GPU setup is strategy.backend=local student.dtype=bf16 teacher.dtype=bf16)")
    if teacher_dtype == "bf16" and student_dtype == "fp16":
        return ("teacher.dtype is bf16 while the student trains in fp16: fp16 runs target GPUs without bf16 "
                "(V100), where a bf16 teacher is slow or fails, and its logits keep 8 mantissa bits where fp16 "
                "keeps 11. Set teacher.dtype=fp16 (or, on Ampere or newer, student.dtype=bf16)")
    if device_type != "cuda" or student_dtype == "fp32" or teacher_dtype != "fp32":
        return None
    return (f"teacher.dtype is fp32 while the student trains in {student_dtype} on CUDA: the teacher takes twice "
            f"the memory and its forwards (rollouts, scoring) read twice the bytes; set teacher.dtype={student_dtype} "
            "unless fp32 teacher outputs are what you want")


@dataclass(frozen=True)
class VocabAlignment:
    """How student and teacher logits line up.

    Models often pad their embedding matrix beyond the tokenizer (Qwen2.5: 151,936 rows for 1.5B and
    152,064 for 7B over a 151,665-token tokenizer). Rows past ``vocab_size`` are never real tokens, so both
    models' logits are cut to the first ``vocab_size`` columns before any softmax: that is the same as
    masking the padded rows out of both distributions.
    """

    vocab_size: int
    student_rows: int
    teacher_rows: int

    def trim(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[..., : self.vocab_size] if logits.shape[-1] != self.vocab_size else logits


def _output_rows(model: "PreTrainedModel") -> int:
    emb = model.get_output_embeddings()
    if emb is not None and getattr(emb, "weight", None) is not None and emb.weight.dim() == 2 and emb.weight.numel():
        return emb.weight.shape[0]
    return int(model.config.get_text_config().vocab_size)


def check_compatibility(student: "PreTrainedModel", teacher: "PreTrainedModel",
                        student_tok: "PreTrainedTokenizerBase",
                        teacher_tok: "PreTrainedTokenizerBase | None" = None) -> VocabAlignment:
    """Check that teacher and student speak the same vocabulary; return how to align their logits.

    Fails with a clear message on a real mismatch (different tokens at the same id, different EOS, a model
    smaller than the tokenizer).
    """
    vocab = len(student_tok)
    if teacher_tok is not None and teacher_tok is not student_tok:
        if len(teacher_tok) != vocab:
            raise ModelCompatibilityError(
                f"teacher tokenizer has {len(teacher_tok)} tokens, student tokenizer {vocab}: distillation needs "
                "one shared vocabulary")
        s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
        if s_vocab != t_vocab:
            diff = sorted(set(s_vocab.items()) ^ set(t_vocab.items()))[:3]
            raise ModelCompatibilityError(f"teacher and student tokenizers map tokens differently, e.g. {diff}")
        if student_tok.eos_token_id != teacher_tok.eos_token_id:
            raise ModelCompatibilityError(
                f"EOS differs: student {student_tok.eos_token_id}, teacher {teacher_tok.eos_token_id}")
    s_rows, t_rows = _output_rows(student), _output_rows(teacher)
    for who, rows in (("student", s_rows), ("teacher", t_rows)):
        if rows < vocab:
            raise ModelCompatibilityError(
                f"the {who} has {rows} output rows but the tokenizer has {vocab} tokens")
    return VocabAlignment(vocab_size=vocab, student_rows=s_rows, teacher_rows=t_rows)


def tiny_llama(vocab_size: int = 256, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
               intermediate_size: int = 64, seed: int = 0, **overrides) -> "PreTrainedModel":
    """A random tiny LlamaForCausalLM for tests and CPU smoke runs (2 layers, hidden 32 by default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         intermediate_size=intermediate_size, max_position_embeddings=512, **overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
