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

from .adapters import is_adapted, load_adapter_weights, save_adapter, save_model_folder
from .config import RunConfig, StrategyConfig
from .tracking import get_logger

log = get_logger()

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
    # The skip was fp16 dynamic loss scaling doing its job (an overflow above the minimum loss scale: the scale
    # is lowered and the next step retries), not a diverging run: the NaN guard does not count it.
    overflow: bool = False


def device_ordinal(local_rank: int, device_count: int) -> int:
    """The CUDA ordinal of the process with ``local_rank``.

    ``torchrun``/``deepspeed`` show every GPU of the node to every process (ordinal = local rank), but launchers
    that give each task its own ``CUDA_VISIBLE_DEVICES`` (``srun --gpus-per-task``) show one device, ordinal 0,
    to processes whose local rank is 0..N-1: ``local_rank % device_count`` is right in both layouts.
    """
    if device_count < 1:
        raise RuntimeError("strategy.device=cuda but no CUDA device is visible to this process "
                           f"(LOCAL_RANK={local_rank}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return local_rank % device_count


def _pick_device(cfg: StrategyConfig, local_rank: int = 0) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", device_ordinal(local_rank, torch.cuda.device_count()))
    return torch.device("cpu")


def comm_backend(device: torch.device) -> str:
    """The process-group backend for tensors on ``device``: NCCL only handles CUDA tensors and gloo the CPU's, so
    it follows the chosen device, not whether the node has a GPU (``strategy.device=cpu`` on a GPU node)."""
    return "nccl" if device.type == "cuda" else "gloo"


class CollectiveDeviceError(RuntimeError):
    """A tensor given to a collective is not on the strategy's device (NCCL would crash; gloo hides it)."""


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
        self._sampling_copy_failed = False  # building or refreshing the copy failed once: decode with the model

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self) -> "LocalStrategy":
        self.device = _pick_device(self.cfg)
        return self

    def cleanup(self, ok: bool = True) -> None:
        """End of the run; ``ok`` False while an exception unwinds (see DeepSpeedStrategy.cleanup)."""

    # -- models ----------------------------------------------------------------------------
    def prepare_student(self, model, optimizer, scheduler):
        self.model, self.optimizer, self.scheduler = model.to(self.device), optimizer, scheduler
        return self.model

    def prepare_teacher(self, model):
        return model.to(self.device).eval()

    def unwrap(self, model):
        return model

    def zero3_init_config(self, *, teacher: bool = False) -> dict | None:
        """The DeepSpeed config to build the student (or teacher) straight into ZeRO-3 shards with
        (``models.load_model(zero3_config=...)``); None when that model is not ZeRO-3-partitioned."""
        return None

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
        if (not enabled or dtype is None or self._sampling_copy_failed
                or all(p.dtype == dtype for p in module.parameters() if p.is_floating_point())):
            yield module  # nothing to cast (fp32 precision, or weights that are half precision already)
            return
        try:
            entry = self._sampling_copies.get(id(module))
            if entry is None or entry[0] is not module:
                entry = self._sampling_copies[id(module)] = (module, HalfPrecisionCopy(module, dtype))
            copy_module = entry[1].refresh()
        except Exception as e:  # an optional speed-up (e.g. out of memory for the copy): never kill the run
            self._sampling_copy_failed = True
            self._sampling_copies.clear()
            log.warning("strategy.sampling_copy: building the bf16 sampling copy of the student failed (%s: %s); "
                        "decoding with the model itself from now on (set strategy.sampling_copy=false to silence "
                        "this)", type(e).__name__, e)
            copy_module = module
        yield copy_module

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # -- optimisation ----------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def skip_micro_step(self, loss: torch.Tensor) -> None:
        """A micro-batch whose loss was not finite (on some rank): no backward, but it still counts towards the
        window."""

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
    def check_collective_tensor(self, tensor: torch.Tensor, what: str) -> None:
        """Every tensor a collective gets must live on ``self.device``: NCCL crashes on a CPU tensor, while gloo
        (CPU runs, the tests) accepts it silently, so this check makes CPU runs fail where a GPU run would."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"strategy.{what}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != self.device:
            raise CollectiveDeviceError(
                f"strategy.{what}: a {tuple(tensor.shape)} {tensor.dtype} tensor is on {tensor.device} but the "
                f"strategy's device is {self.device}; create it with device=strategy.device (NCCL accepts only "
                "tensors on the rank's GPU)")

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        self.check_collective_tensor(tensor, "all_reduce")
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
            save_model_folder(self.unwrap(model), directory, tokenizer)  # merged + adapter/ for a LoRA student

    def save_checkpoint(self, directory: str | Path, tokenizer) -> None:
        directory = Path(directory)
        if is_adapted(self.unwrap(self.model)):  # student.peft: the adapter is all that trains
            save_adapter(self.unwrap(self.model), directory, tokenizer)
        else:
            self.save_hf(self.model, tokenizer, directory)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "micro": self._micro}, directory / "optimizer.pt")

    def load_checkpoint(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        directory, model = Path(directory), self.unwrap(self.model)
        if is_adapted(model):  # student.peft: the frozen base is the one loaded from student.path
            load_adapter_weights(model, directory)
        else:
            state = {}
            for shard in sorted(directory.glob("*.safetensors")):
                state.update(load_file(shard, device=str(self.device)))
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


def single_process_rendezvous(env) -> dict[str, str]:
    """Rendezvous variables missing from ``env`` for a DeepSpeed run started without a launcher (one rank). The
    port is a free one: with a fixed one, two such runs on a machine (notebooks, a sweep, test workers) collide and
    the second fails at start. WORLD_SIZE > 1 set by hand keeps a fixed port, which its ranks must agree on."""
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    if "MASTER_PORT" not in env:
        if env.get("WORLD_SIZE", "1") == "1":
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                defaults["MASTER_PORT"] = str(s.getsockname()[1])
        else:
            defaults["MASTER_PORT"] = "29517"
    return {k: v for k, v in defaults.items() if k not in env}


class DeepSpeedStrategy(LocalStrategy):
    """DeepSpeed engines: the student trains under ZeRO 0-3; the teacher is an inference engine.

    Launch with ``deepspeed -m minillm.cli.train``, ``torchrun -m minillm.cli.train`` or in one plain
    process (the rendezvous variables then default to a single rank).
    """

    backend = "deepspeed"

    def __init__(self, run: RunConfig):
        super().__init__(run)
        self._engines: dict[int, Any] = {}  # id(module) → its ZeRO-3 engine, to find the hooks from a bare module
        self._unhooked: set[int] = set()  # id(module) of ZeRO-3 modules whose hooks are removed right now
        self._window_has_gradient = False  # some micro-step of the current accumulation window ran a real backward

    def setup(self) -> "DeepSpeedStrategy":
        os.environ.update(single_process_rendezvous(os.environ))  # else init_distributed tries MPI discovery
        # The device comes first: the backend and DeepSpeed's accelerator follow it, not the node's hardware.
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.device = _pick_device(self.cfg, self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            accelerator = os.environ.setdefault("DS_ACCELERATOR", "cpu")
            if accelerator != "cpu":
                raise RuntimeError(f"strategy.device is {self.device} but DS_ACCELERATOR={accelerator}: DeepSpeed "
                                   "would place the engines there; unset DS_ACCELERATOR or set it to cpu")
            # The CPU accelerator JIT-compiles a shared-memory all-reduce op (~30 s) on first use; plain gloo
            # gives identical results, so skip the build. (`import deepspeed.comm.torch as m` would bind torch.)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        import deepspeed
        from datetime import timedelta

        deepspeed.init_distributed(dist_backend=comm_backend(self.device),
                                   timeout=timedelta(minutes=self.cfg.dist_timeout_minutes))
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        return self

    def cleanup(self, ok: bool = True) -> None:
        """Tear the process group down. ``ok`` False while an exception unwinds: then no barrier, because the
        other ranks are not coming to it (they are inside some collective, or dead), and waiting for them would
        hide this rank's error behind a hang until the collective timeout; exiting lets the launcher stop the
        rest. On success the barrier keeps ranks from leaving while others still write (and without an
        explicit teardown, two-process gloo runs sometimes abort at exit: env-notes §2c)."""
        if not torch.distributed.is_initialized():
            return
        if ok:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
            return
        try:
            torch.distributed.destroy_process_group()
        except Exception as e:  # the real error is already unwinding: do not replace it with this one
            log.warning("rank %d: destroying the process group after an error failed: %s", self.rank, e)

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

    def zero3_init_config(self, *, teacher: bool = False) -> dict | None:
        stage = self.teacher_stage() if teacher else self.cfg.zero_stage
        return self.ds_config(teacher=teacher) if stage == 3 else None

    # -- models ----------------------------------------------------------------------------
    def prepare_student(self, model, optimizer, scheduler):
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config())
        self.model, self.optimizer, self.scheduler = engine, optimizer, scheduler
        self._engines[id(engine.module)] = engine
        return engine

    def prepare_teacher(self, model):
        if self.teacher_stage() == 0 or getattr(model, "is_remote_teacher", False):  # a served teacher: its head
            return model.to(self.device).eval()  # a replicated frozen copy needs no engine
        import deepspeed

        engine = deepspeed.initialize(model=model, config=self.ds_config(teacher=True))[0]
        engine.eval()
        self._engines[id(engine.module)] = engine
        return engine

    def unwrap(self, model):
        return getattr(model, "module", model)

    def is_zero3(self, model) -> bool:
        return any(hasattr(p, "ds_id") for p in self.unwrap(model).parameters())

    @contextlib.contextmanager
    def gathered(self, model) -> Iterator[Any]:
        """Full parameters on every rank for the duration (one gather, not one per layer per token), and no
        ZeRO-3 module hooks: forwards inside are purely local, so ranks may run different numbers of them.

        That is what generation needs. Each rank decodes until its own rows stop (and GKD/DistiLLM coins, mixed
        sampling draws and EOS positions differ per rank); with DeepSpeed's hooks still installed every forward
        would re-fetch and release the parameters submodule by submodule (all-gathers) and the root hook
        would join trace checks across ranks, so the rank that stops first leaves the others waiting forever in
        a collective (NCCL: until the watchdog kills the job). The hooks are put back on exit, before the
        parameters are partitioned again; entering and leaving are collective (every rank must do both).
        """
        module = self.unwrap(model)
        if not self.is_zero3(module):
            yield module
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None), \
                self._zero3_hooks_removed(model):
            yield module

    def _zero3_offload(self, model):
        """DeepSpeed's ZeRO-3 parameter-offload object that owns ``model``'s module hooks, or None."""
        engine = model if hasattr(model, "module") else self._engines.get(id(model))
        optimizer = getattr(engine, "optimizer", None)
        # training engine: the ZeRO-3 optimizer holds it; frozen inference engine: the optimizer slot is it
        offload = getattr(optimizer, "parameter_offload", optimizer)
        needed = ("forward_hooks", "backward_hooks", "fwd_pre_hook", "module", "_register_deepspeed_module")
        return offload if all(hasattr(offload, name) for name in needed) else None

    @contextlib.contextmanager
    def _zero3_hooks_removed(self, model) -> Iterator[None]:
        offload = self._zero3_offload(model)
        if offload is None:
            raise RuntimeError(f"{type(self.unwrap(model)).__name__} is ZeRO-3-partitioned but not by an engine of "
                               "this strategy (prepare_student / prepare_teacher); cannot generate with it safely")
        module = offload.module
        if id(module) in self._unhooked:  # nested use: the outer context restores the hooks
            yield
            return
        # DeepSpeed keeps the start-of-forward hook (trace bookkeeping, which all-gathers while the trace is
        # being recorded) apart from the per-submodule fetch/release hooks; remove both and keep the former's
        # function to put it back.
        start_hook = module._forward_pre_hooks[offload.fwd_pre_hook.id]
        for hook in (*offload.forward_hooks, *offload.backward_hooks, offload.fwd_pre_hook):
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        for p in module.parameters():
            p.ds_active_sub_modules.clear()  # nothing is "in use" by a hook: the gather's exit may release all
        self._unhooked.add(id(module))
        try:
            yield
        finally:
            self._unhooked.discard(id(module))
            offload.fwd_pre_hook = module.register_forward_pre_hook(start_hook)
            # re-registers every submodule's hooks and invalidates the recorded trace (it re-records on the
            # next training forward); a fresh counter numbers the submodules as at the first registration
            offload._register_deepspeed_module(module, count=[0])

    def sampling_model(self, model):
        """Rollouts decode with the engine's own weights (already bf16/fp16 in its half-precision modes)."""
        return self.gathered(model)

    def autocast(self):
        return contextlib.nullcontext()  # the engine runs the module in its configured precision

    # -- optimisation ----------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # scales by 1/accumulation itself
        self._window_has_gradient = True

    def skip_micro_step(self, loss: torch.Tensor) -> None:
        """Backward a zero instead of skipping backward: the engine's micro-step bookkeeping, ZeRO-1/2's gradient
        buffers (a boundary step after no backward finds them None: TypeError) and every collective of the
        backward run as on a normal micro-step, on every rank (the NaN guard skips on all ranks together).

        ZeRO 0-2: the zero is built from the parameters themselves, not from the loss, whose graph holds the
        non-finite values (0 × NaN is NaN): every gradient is exactly 0. ZeRO-3 parameters are empty shards
        outside a forward, so there the zero is the loss's own graph with its non-finite values zeroed; its
        backward runs the forward's parameter fetches, and should the gradient still come out non-finite,
        DeepSpeed drops the step (fp32, fp16 and, by default, bf16 check for that)."""
        params = [p for p in self.unwrap(self.model).parameters() if p.requires_grad]
        if self.cfg.zero_stage < 3 and params:
            zero = sum(p.reshape(-1)[:1].float().sum() for p in params) * 0.0
        else:
            zero = torch.nan_to_num(loss.float(), nan=0.0, posinf=0.0, neginf=0.0) * 0.0
        self.model.backward(zero)

    def _loss_scale(self) -> float | None:
        """The fp16 dynamic loss scale now; None unless the student trains in fp16 with a dynamic scale (a static
        ``fp16.loss_scale`` never adapts, so each of its overflows counts)."""
        if self.run.student.dtype != "fp16" or self.ds_config()["fp16"].get("loss_scale", 0) != 0:
            return None
        # ZeRO-1/2/3 optimizers: .loss_scale / .loss_scaler.cur_scale; ZeRO-0's FP16_Optimizer: .loss_scale_config
        owners = (self.optimizer, getattr(self.optimizer, "loss_scaler", None),
                  getattr(self.optimizer, "loss_scale_config", None))
        for owner in owners:
            for name in ("loss_scale", "cur_scale"):
                value = getattr(owner, name, None)
                if isinstance(value, (int, float, torch.Tensor)):
                    return float(value)
        return None

    def _min_loss_scale(self) -> float:
        for owner, name in ((getattr(self.optimizer, "loss_scaler", None), "min_scale"),
                            (getattr(self.optimizer, "loss_scale_config", None), "min_loss_scale")):
            value = getattr(owner, name, None)
            if isinstance(value, (int, float)):
                return float(value)
        return float(self.ds_config()["fp16"].get("min_loss_scale", 1.0))  # DeepSpeed's default minimum is 1

    def step(self) -> StepResult:
        boundary = self.model.is_gradient_accumulation_boundary()
        scale = self._loss_scale() if boundary else None
        # A window whose every micro-step was skipped has an all-zero gradient, but Adam's momentum and weight
        # decay would still move the weights: step at learning rate 0 (the local strategy's None gradients move
        # nothing either). A scheduler step inside the engine's step sets the learning rates again; when none
        # happened (no scheduler, or an fp16 overflow skipped it), the saved ones are put back.
        frozen = boundary and not self._window_has_gradient
        groups = self.optimizer.param_groups if frozen else []
        saved = [g["lr"] for g in groups]
        scheduler = getattr(self.model, "lr_scheduler", None)
        epoch = getattr(scheduler, "last_epoch", None)
        for g in groups:
            g["lr"] = 0.0
        self.model.step()
        if frozen and (epoch is None or getattr(scheduler, "last_epoch", None) == epoch):
            for g, lr in zip(groups, saved):
                g["lr"] = lr
        if not boundary:
            return StepResult(stepped=False)
        self._window_has_gradient = False
        norm = self.model.get_global_grad_norm()
        norm = float(norm) if norm is not None else None
        skipped = bool(getattr(self.optimizer, "overflow", False))  # DeepSpeed dropped the step (grad not finite)
        # fp16: an overflow is routine loss scaling (the scale halves, the next step retries) unless the scale
        # was already at its minimum, where halving is no longer possible: only that is a real divergence.
        overflow = skipped and scale is not None and scale > self._min_loss_scale()
        if overflow:
            log.info("fp16 loss-scale overflow at scale %g: step skipped, the scale is now %s", scale,
                     self._loss_scale())
        return StepResult(stepped=True, grad_norm=norm, skipped=skipped, overflow=overflow)

    def current_lr(self) -> float:
        return float(self.model.get_lr()[0])

    # -- communication ---------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
               "min": torch.distributed.ReduceOp.MIN}
        self.check_collective_tensor(tensor, "all_reduce")
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
                save_model_folder(module, directory, tokenizer)  # merged + adapter/ for a LoRA student
        self.barrier()

    def save_checkpoint(self, directory: str | Path, tokenizer) -> None:
        directory = Path(directory)
        adapted = is_adapted(self.unwrap(self.model))
        if adapted:  # student.peft: the adapter (for eval of the checkpoint); the engine state below resumes
            with self.gathered(self.model) as module:
                if self.is_main:
                    save_adapter(module, directory, tokenizer)
            self.barrier()
        else:
            self.save_hf(self.model, tokenizer, directory)
        # Model, fp32 master weights, optimizer and scheduler, sharded as ZeRO holds them (a LoRA student's
        # frozen base is left out: it is reloaded from student.path).
        self.model.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False,
                                   exclude_frozen_parameters=adapted)

    def load_checkpoint(self, directory: str | Path) -> None:
        path, _ = self.model.load_checkpoint(str(Path(directory) / "deepspeed"), tag="state",
                                             load_optimizer_states=True, load_lr_scheduler_states=True,
                                             load_module_strict=not is_adapted(self.unwrap(self.model)))
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
