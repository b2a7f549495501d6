"""Where the work runs: a small strategy object between the trainers and torch / DeepSpeed.

Trainers never touch DeepSpeed directly. They call:

    strategy.setup()                                     # process group, device
    student = strategy.prepare_student(model, optimizer, scheduler)
    teacher = strategy.prepare_teacher(model)           # frozen; ZeRO-3-sharded when configured
    with strategy.autocast(): loss = ...
    strategy.backward(loss); result = strategy.step()    # every micro-batch; steps at accumulation boundaries
    strategy.all_reduce(t), strategy.barrier(), strategy.is_main
    with strategy.gathered(model): model.generate(...)   # full parameters for generation / export
    with strategy.sampling_model(model) as m: ...        # what rollouts and dev answers decode with
    strategy.save_checkpoint(dir, tokenizer); strategy.load_checkpoint(dir)

``LocalStrategy`` is plain torch on the CPU or one GPU. ``DeepSpeedStrategy`` wraps the student in a
DeepSpeed training engine (ZeRO 0-3, bf16/fp16) and the teacher in an inference engine, sharded under
ZeRO-3 instead of copied onto every GPU. DeepSpeed is imported only inside the latter.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import RunConfig, StrategyConfig

PRESET_DIR = Path(__file__).resolve().parent / "presets" / "deepspeed"


class HalfPrecisionCopy:
    """A bf16/fp16 copy of a module whose trained weights are fp32, for decoding (``strategy.sampling_copy``).

    Decoding one token reads every weight once, so it is memory-bound: under autocast each step reads the fp32
    weights (4 bytes), writes their cast (2) and reads it again (2), four times the bytes of reading half-precision
    weights. CUDA graphs replay the casts too. The copy costs 2 bytes per parameter and one cast of the weights
    per :meth:`refresh` (once per generation batch, negligible next to the batch's hundreds of decoding steps).

    Parameters are cast, buffers are copied as they are (rotary frequencies stay fp32, as ``from_pretrained``
    with a half ``dtype`` keeps them), and tied parameters stay tied. :meth:`refresh` copies in place, so the
    copy's parameter storage never moves and CUDA graphs captured on it stay valid across refreshes.
    """

    def __init__(self, source: torch.nn.Module, dtype: torch.dtype):
        # deepcopy takes a parameter from the memo when it is there: each one maps straight to its half-precision
        # clone, so no full-precision duplicate is ever allocated and gradients are not copied.
        memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in source.parameters()}
        self.module = copy.deepcopy(source, memo)
        for attr in ("_compiled_call", "_last_compile_config"):  # HF's compiled __call__ is bound to `source`
            self.module.__dict__.pop(attr, None)
        self.module.eval()  # no dropout; HF checkpoints activations only in train mode
        copied, original = list(self.module.named_parameters()), list(source.named_parameters())
        if [name for name, _ in copied] != [name for name, _ in original]:
            raise RuntimeError(f"HalfPrecisionCopy: the copy of {type(source).__name__} does not have the source's "
                               "parameters in the source's order; set strategy.sampling_copy=false")
        self._pairs = [(half, full) for (_, half), (_, full) in zip(copied, original)]

    @torch.no_grad()
    def refresh(self) -> torch.nn.Module:
        """Copy the source's current weights (cast) into the copy and return it."""
        for half, full in self._pairs:
            half.copy_(full)
        return self.module


@dataclass
class StepResult:
    """What one call of ``Strategy.step`` did."""

    stepped: bool  # an optimizer step was taken (end of an accumulation window)
    grad_norm: float | None = None  # global gradient norm before clipping, when it stepped
    skipped: bool = False  # the step was dropped because the gradient was not finite


def _pick_device(cfg: StrategyConfig, local_rank: int = 0) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class LocalStrategy:
    """Plain torch in one process: CPU or one GPU, optional bf16/fp16 autocast over fp32 weights."""

    backend = "local"

    def __init__(self, run: RunConfig):
        self.run = run
        self.cfg = run.strategy
        self.rank, self.local_rank, self.world_size = 0, 0, 1
        self.accumulation = max(1, run.train.gradient_accumulation_steps)
        self.precision = run.student.dtype
        self.device = torch.device("cpu")
        self._micro = 0
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self._sampling_copies: dict[int, tuple[torch.nn.Module, HalfPrecisionCopy]] = {}  # id(model) → copy

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self) -> "LocalStrategy":
        self.device = _pick_device(self.cfg)
        return self

    def cleanup(self) -> None:
        pass

    # -- models ----------------------------------------------------------------------------
    def prepare_student(self, model, optimizer, scheduler):
        self.model, self.optimizer, self.scheduler = model.to(self.device), optimizer, scheduler
        return self.model

    def prepare_teacher(self, model):
        return model.to(self.device).eval()

    def unwrap(self, model):
        return model

    @contextlib.contextmanager
    def gathered(self, model) -> Iterator[Any]:
        yield self.unwrap(model)

    @contextlib.contextmanager
    def sampling_model(self, model) -> Iterator[Any]:
        """The module rollouts and dev answers decode with: ``model`` itself, or with ``strategy.sampling_copy``
        (default on CUDA for bf16 precision) a :class:`HalfPrecisionCopy` of it, refreshed on entry."""
        module = self.unwrap(model)
        dtype = torch.bfloat16 if self.precision == "bf16" else None
        enabled = self.cfg.sampling_copy if self.cfg.sampling_copy is not None else self.device.type == "cuda"
        if not enabled or dtype is None or all(p.dtype == dtype for p in module.parameters() if p.is_floating_point()):
            yield module  # nothing to cast (fp32 precision, or weights that are half precision already)
            return
        entry = self._sampling_copies.get(id(module))
        if entry is None or entry[0] is not module:
            entry = self._sampling_copies[id(module)] = (module, HalfPrecisionCopy(module, dtype))
        yield entry[1].refresh()

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # -- optimisation ----------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def skip_micro_step(self) -> None:
        """A micro-batch whose loss was not finite: no backward, but it still counts towards the window."""

    def step(self) -> StepResult:
        self._micro += 1
        if self._micro % self.accumulation:
            return StepResult(stepped=False)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.run.optim.clip_grad
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        norm = float(norm)
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(stepped=True, grad_norm=norm, skipped=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(stepped=True, grad_norm=norm)

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- communication ---------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def barrier(self) -> None:
        pass

    # -- checkpoints -----------------------------------------------------------------------
    def save_hf(self, model, tokenizer, directory: str | Path) -> None:
        """An HF folder (safetensors) loadable by AutoModelForCausalLM.from_pretrained."""
        if self.is_main:
            self.unwrap(model).save_pretrained(directory, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)

    def save_checkpoint(self, directory: str | Path, tokenizer) -> None:
        directory = Path(directory)
        self.save_hf(self.model, tokenizer, directory)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "micro": self._micro}, directory / "optimizer.pt")

    def load_checkpoint(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        directory = Path(directory)
        state = {}
        for shard in sorted(directory.glob("*.safetensors")):
            state.update(load_file(shard, device=str(self.device)))
        model = self.unwrap(self.model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Tied output embeddings are saved once; anything else missing is a real problem.
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"{directory}: checkpoint does not match the model (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
        opt = torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        self._micro = int(opt["micro"])


class DeepSpeedStrategy(LocalStrategy):
    """DeepSpeed engines: the student trains under ZeRO 0-3; the teacher is an inference engine.

    Launch with ``deepspeed -m minillm.cli.train``, ``torchrun -m minillm.cli.train`` or in one plain
    process (the rendezvous variables then default to a single rank).
    """

    backend = "deepspeed"

    def setup(self) -> "DeepSpeedStrategy":
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}.items():
            os.environ.setdefault(key, value)  # without them init_distributed falls back to MPI discovery
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            # The CPU accelerator JIT-compiles a shared-memory all-reduce op (~30 s) on first use; plain gloo
            # gives identical results, so skip the build. (`import deepspeed.comm.torch as m` would bind torch.)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        import deepspeed
        from datetime import timedelta

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend,
                                   timeout=timedelta(minutes=self.cfg.dist_timeout_minutes))
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = _pick_device(self.cfg, self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        return self

    def cleanup(self) -> None:
        # Without an explicit teardown two-process gloo runs sometimes abort at exit (env-notes §2c).
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    # -- DeepSpeed configs -----------------------------------------------------------------
    def ds_config(self, *, teacher: bool = False) -> dict:
        run, cfg = self.run, self.cfg
        config: dict = {}
        if cfg.deepspeed_config:
            config = load_deepspeed_preset(cfg.deepspeed_config)
        stage = self.teacher_stage() if teacher else cfg.zero_stage
        zero = dict(config.get("zero_optimization", {}))
        zero["stage"] = stage
        if not teacher and cfg.offload_optimizer and stage > 0:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        if cfg.offload_params and stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        config["zero_optimization"] = zero
        dtype = (run.teacher if teacher else run.student).dtype
        config["bf16"] = {"enabled": dtype == "bf16"}
        fp16 = dict(config.get("fp16", {}))
        fp16.update({"enabled": dtype == "fp16"})
        fp16.setdefault("loss_scale", 0)
        fp16.setdefault("initial_scale_power", 11)
        fp16.setdefault("loss_scale_window", 2000)
        fp16.setdefault("hysteresis", 4)
        config["fp16"] = fp16
        config["train_micro_batch_size_per_gpu"] = run.train.micro_batch_size
        config["gradient_accumulation_steps"] = 1 if teacher else self.accumulation
        config["train_batch_size"] = run.train.micro_batch_size * self.world_size * config["gradient_accumulation_steps"]
        if not teacher:
            config["gradient_clipping"] = run.optim.clip_grad
            config["zero_allow_untested_optimizer"] = True
        config.setdefault("steps_per_print", 10**9)
        config.setdefault("wall_clock_breakdown", False)
        return config

    def teacher_stage(self) -> int:
        if self.cfg.teacher_zero_stage is not None:
            return self.cfg.teacher_zero_stage
        return 3 if self.cfg.zero_stage == 3 else 0

    # -- models ----------------------------------------------------------------------------
    def prepare_student(self, model, optimizer, scheduler):
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config())
        self.model, self.optimizer, self.scheduler = engine, optimizer, scheduler
        return engine

    def prepare_teacher(self, model):
        if self.teacher_stage() == 0:
            return model.to(self.device).eval()  # a replicated frozen copy needs no engine
        import deepspeed

        engine = deepspeed.initialize(model=model, config=self.ds_config(teacher=True))[0]
        engine.eval()
        return engine

    def unwrap(self, model):
        return getattr(model, "module", model)

    def is_zero3(self, model) -> bool:
        return any(hasattr(p, "ds_id") for p in self.unwrap(model).parameters())

    @contextlib.contextmanager
    def gathered(self, model) -> Iterator[Any]:
        """Full parameters on every rank for the duration (one gather, not one per layer per token)."""
        module = self.unwrap(model)
        if not self.is_zero3(module):
            yield module
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield module

    def sampling_model(self, model):
        """Rollouts decode with the engine's own weights (already bf16/fp16 in its half-precision modes)."""
        return self.gathered(model)

    def autocast(self):
        return contextlib.nullcontext()  # the engine runs the module in its configured precision

    # -- optimisation ----------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # scales by 1/accumulation itself

    def step(self) -> StepResult:
        boundary = self.model.is_gradient_accumulation_boundary()
        self.model.step()
        if not boundary:
            return StepResult(stepped=False)
        norm = self.model.get_global_grad_norm()
        norm = float(norm) if norm is not None else None
        skipped = bool(getattr(self.optimizer, "overflow", False))  # fp16 loss-scale overflow skips the step
        return StepResult(stepped=True, grad_norm=norm, skipped=skipped)

    def current_lr(self) -> float:
        return float(self.model.get_lr()[0])

    # -- communication ---------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
               "min": torch.distributed.ReduceOp.MIN}
        torch.distributed.all_reduce(tensor, op=ops[op])
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        torch.distributed.barrier()

    # -- checkpoints -----------------------------------------------------------------------
    def save_hf(self, model, tokenizer, directory: str | Path) -> None:
        with self.gathered(model) as module:
            if self.is_main:
                module.save_pretrained(directory, safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(directory)
        self.barrier()

    def save_checkpoint(self, directory: str | Path, tokenizer) -> None:
        directory = Path(directory)
        self.save_hf(self.model, tokenizer, directory)
        # Model, fp32 master weights, optimizer and scheduler, sharded as ZeRO holds them.
        self.model.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False)

    def load_checkpoint(self, directory: str | Path) -> None:
        path, _ = self.model.load_checkpoint(str(Path(directory) / "deepspeed"), tag="state",
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"{directory}: no DeepSpeed state to resume from")


def load_deepspeed_preset(name_or_path: str) -> dict:
    """A shipped preset (``zero1``, ``zero2``, ``zero3``, ``zero3_offload``) or a JSON file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PRESET_DIR / (name_or_path if name_or_path.endswith(".json") else name_or_path + ".json")
    if not path.is_file():
        presets = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
        raise FileNotFoundError(f"strategy.deepspeed_config: `{name_or_path}` is neither a JSON file nor a preset "
                                f"({', '.join(presets)})")
    try:
        return copy.deepcopy(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e


def build_strategy(run: RunConfig) -> LocalStrategy:
    return (DeepSpeedStrategy if run.strategy.backend == "deepspeed" else LocalStrategy)(run)
