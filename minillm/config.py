"""The configuration tree: dataclasses mirrored one-to-one by YAML.

Precedence is dataclass defaults < YAML file < ``key.sub=value`` overrides. Unknown keys and values of
the wrong type fail with a :class:`ConfigError` that names the key and the file. Values derived from
others (gradient accumulation, rollouts per rank, ...) are computed and checked in one place,
:meth:`RunConfig.resolve`, before any model is loaded; the resolved tree is what gets written to
``output_dir/config.yaml``.

Every field is documented where it is defined (the ``doc`` metadata); ``minillm-train --explain``
prints them all. This module imports only the standard library and PyYAML so that ``--help`` and
``--dry-run`` stay fast.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

from .adapter_config import PeftConfig
from .config_checks import parse_duration  # noqa: F401 (re-exported: minillm.config.parse_duration)
from .config_io import (  # noqa: F401 (re-exported: the loader's public names have always lived here)
    ConfigError, _f, _coerce, _type_name, apply_overrides, from_dict, parse_override, to_dict, to_yaml)


Method = Literal["sft", "kd", "seqkd", "minillm"]
DType = Literal["fp32", "bf16", "fp16"]
Divergence = Literal["fkl", "rkl", "jsd", "tvd", "sfkl", "srkl"]


# --------------------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """A causal LM: the student (trained) or the teacher (frozen). Used by ``minillm.models``."""

    path: str = _f("", "HF hub id or local folder of the model (a save_pretrained folder).")
    tokenizer: Optional[str] = _f(None, "Tokenizer hub id or folder; defaults to `path`.")
    dtype: DType = _f(
        "fp32",
        "Precision. Student: the training precision (local backend: fp32 weights + autocast; "
        "deepspeed: its bf16/fp16 mode with fp32 master weights). Teacher: the dtype weights are loaded in.",
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward (student only).")
    trust_remote_code: bool = _f(False, "Allow code from the model repository to run. Off unless you trust it.")
    revision: Optional[str] = _f(None, "Hub revision (branch, tag or commit) to load.")
    peft: PeftConfig = field(default_factory=PeftConfig, metadata={"doc": "LoRA adapter (student only): train it instead of the weights."})
    server: Union[list[str], str, None] = _f(
        None, "Teacher only: minillm-teacher-serve URL(s): a list, or one string (several comma-separated), kept as "
        "a list; the run then holds only the LM head read from `path` and gets the final hidden states over HTTP.")
    server_timeout: float = _f(120.0, "Teacher only: seconds one request to teacher.server may take.")
    server_retries: int = _f(5, "Teacher only: retries of a failed teacher.server request (backoff from 0.5 s, "
                             "over the URLs in turn) before the run checkpoints and stops.")

    def __post_init__(self) -> None:
        if isinstance(self.server, str):  # `http://a:8001,http://b:8001` (CLI overrides) -> the list read by the code
            self.server = [u.strip() for u in self.server.split(",") if u.strip()]


@dataclass
class TeacherConfig(ModelConfig):
    """One of several teachers (`teachers:`): a ModelConfig with a name that routes and metric keys refer to."""

    name: str = _f("", "Unique name: what routing.routes maps records to, and the <name> of teacher/<name>/* "
                   "metrics.")


@dataclass
class RoutingConfig:
    """Which of `teachers:` supervises each training record (minillm.routing)."""

    by: Literal["field", "file", "dataset"] = _f("field", "field: by the record's `routing.field`. file / dataset: "
                                                 "by its data.train entry (a path / a set name or hub id).")
    field: str = _f("source", "The record field whose value picks the teacher (by: field).")
    routes: dict = _f({}, "Field value (file, dataset) -> teacher. Empty (by: field): the value is the teacher's name.")
    default: Optional[str] = _f(None, "Teacher of records without a route (null: such a record is an error).")
    pretrain_teacher: Optional[str] = _f(None, "Teacher of the PT/KD term on data.pretrain and of dev metrics "
                                         "(null: the first of `teachers:`).")


@dataclass
class DataConfig:
    """Instruction data and the pre-training corpus. Used by ``minillm.data``."""

    train: Union[str, list[str]] = _f("dolly", "Training set: a named set (dolly, dolly-15k, self_inst, vicuna, "
                                      "sinst, uinst), a local .json/.jsonl file, or an HF dataset id; or a list of "
                                      "them, concatenated (routing.by: file / dataset route each to a teacher).")
    dev: Optional[str] = _f(None, "Dev set (same forms as `train`). None: the first `dev_num` records of "
                            "`train` become dev, as the reference does for Dolly.")
    dev_num: int = _f(1000, "Records split off `train` as dev when `dev` is None (0: no dev set).")
    max_train_records: int = _f(-1, "Use at most this many training records (-1: all).")
    max_dev_records: int = _f(-1, "Use at most this many dev records (-1: all).")
    template: Literal["auto", "reference", "chat", "raw"] = _f(
        "auto",
        "Prompt format. auto: records with a `prompt` field are used verbatim, instruction records get "
        "the reference template. reference: always the reference (Alpaca/Dolly) template. chat: the "
        "tokenizer's chat template. raw: `prompt`/`instruction` verbatim.",
    )
    response_field: str = _f("output", "Field holding the reference response(s) in {prompt, ...} records.")
    max_prompt_length: int = _f(256, "Prompts with more tokens are dropped (and counted).")
    max_length: int = _f(512, "Prompt+response sequences are truncated to this many tokens.")
    pretrain: Optional[str] = _f(None, "Pre-training corpus for the PT loss: a packed chunk folder made by "
                                 "minillm.data (or minillm-data), a text/.jsonl file, glob or folder to pack, or "
                                 "the reference's processed Megatron .bin/.idx prefix (read in place).")
    pretrain_seq_length: int = _f(512, "Tokens per packed pre-training chunk.")
    pretrain_text_field: str = _f("text", "Field holding the document text in .jsonl pre-training files.")
    cache_dir: str = _f(".cache/minillm", "Where packed corpora and converted sets are cached.")
    num_workers: int = _f(0, "DataLoader worker processes.")


@dataclass
class TrainLoopConfig:
    """The training loop. Used by the trainers."""

    DURATION_FIELDS = ("max_time",)  # "H:MM:SS" strings that YAML 1.1 may read as base-60 integers (from_dict)

    max_steps: int = _f(-1, "Optimizer steps to run (-1: `epochs` decides).")
    epochs: int = _f(10, "Passes over the training data (the run stops at whichever limit comes first).")
    micro_batch_size: int = _f(2, "Sequences per forward/backward on one rank.")
    global_batch_size: int = _f(32, "Sequences per optimizer step over all ranks.")
    gradient_accumulation_steps: int = _f(
        -1, "Derived: global_batch_size / (micro_batch_size x world size). Leave at -1.")
    eval_interval: int = _f(-1, "Evaluate every N optimizer steps (-1: once per epoch, 0: never).")
    save_interval: int = _f(-1, "Checkpoint every N optimizer steps (-1: once per epoch, 0: only final).")
    keep_checkpoints: int = _f(2, "Keep the newest N step checkpoints (-1: keep all).")
    select_best_by: Literal["rougeL", "loss", "none"] = _f(
        "rougeL", "Dev metric that picks best/: rougeL (higher is better) or loss (lower is better).")
    max_nan_skips: int = _f(10, "Optimizer steps with a non-finite loss are skipped; abort after this many.")
    eval_at_start: bool = _f(False, "Evaluate before the first step.")
    stop_at_step: int = _f(-1, "Save and stop at this step as if interrupted, without changing the schedule "
                           "(time-boxed jobs; continue later with --resume). -1: off.")
    max_time: str = _f("", "Wall-time budget of this process, \"H:MM:SS\" (or \"D-HH:MM:SS\", or seconds): checkpoint "
                       "and exit (status 75) before it runs out, leaving room for one more step and the save; "
                       "continue with --resume auto. Empty: no budget.")

    def max_time_seconds(self) -> float | None:
        return parse_duration(self.max_time) if self.max_time else None


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule. Used by ``minillm.optim``."""

    lr: float = _f(5e-4, "Peak learning rate.")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and norm weights).")
    betas: list = _f([0.9, 0.999], "AdamW betas.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    scheduler: Literal["constant", "cosine", "linear", "noam"] = _f(
        "cosine", "LR schedule after warm-up: constant, cosine (to min_lr over the run), linear, noam.")
    warmup_steps: int = _f(0, "Linear warm-up steps.")
    min_lr: float = _f(1e-7, "Floor of the cosine schedule.")
    clip_grad: float = _f(1.0, "Clip the global gradient norm to this (0: off).")


@dataclass
class StrategyConfig:
    """How the work is placed on devices. Used by ``minillm.strategy``."""

    backend: Literal["local", "deepspeed"] = _f("local", "local: plain torch, one process. deepspeed: ZeRO.")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto: CUDA when available, else CPU.")
    zero_stage: int = _f(1, "DeepSpeed ZeRO stage of the student (0-3).")
    teacher_zero_stage: Optional[int] = _f(
        None, "ZeRO stage of the teacher inference engine (0 or 3). None: 3 when the student uses 3, else 0.")
    offload_optimizer: bool = _f(False, "ZeRO: keep optimizer states in CPU memory.")
    offload_params: bool = _f(False, "ZeRO-3: keep parameters in CPU memory.")
    deepspeed_config: Optional[str] = _f(
        None, "A preset name (zero1, zero2, zero3, zero3_offload) or a JSON path merged over the generated "
              "DeepSpeed config; batch sizes, clipping and precision always come from this config.")
    dist_timeout_minutes: int = _f(30, "Timeout of collective operations.")
    sampling_copy: Optional[bool] = _f(
        None, "local backend with student.dtype bf16: generate rollouts and dev answers from a bf16 copy of the "
              "student's fp32 weights, refreshed from them before every generation batch. Decoding is memory-bound, "
              "and autocast re-reads the fp32 weights and re-casts them at every token. Costs 2 bytes per "
              "parameter. None: on when the device is CUDA.")


@dataclass
class KDConfig:
    """Word-level distillation (methods kd and seqkd, and the KD half of the PT loss)."""

    kd_ratio: float = _f(0.5, "Loss = (1 - kd_ratio) * CE + kd_ratio * divergence.")
    divergence: Divergence = _f("fkl", "fkl (reference KD), rkl, jsd, tvd, sfkl, srkl (see losses.divergence).")
    beta: float = _f(0.5, "JSD weight: m = beta*p + (1-beta)*q. The ends are the limits of the normalised JSD, as "
                     "in GKD/TRL: 0 is forward KL(p||q), 1 is reverse KL(q||p).")
    skew: float = _f(0.1, "Skew of the skew KL divergences.")
    temperature: float = _f(1.0, "Both models' logits are divided by this in the KD term.")
    ptx_coef: float = _f(0.0, "Weight of a language-modelling loss on data.pretrain added to every micro-batch of "
                         "sft/kd/seqkd (DistiLLM's --lm-coef; 0: off).")
    chunked: bool = _f(True, "Compute CE and the KD term from hidden states + LM head, chunk_size positions at a "
                       "time (equal to the plain path to fp32 rounding).")
    chunk_size: int = _f(1024, "Token positions per chunk of the chunked KD losses.")
    teacher_cache: Optional[str] = _f(
        None, "Folder of the teacher's top-k distributions on this run's training set (`minillm-teacher-cache "
        "--config RUN.yaml`): the KD term reads them instead of running the teacher, which then stays off the "
        "GPUs. Top-k rows spread the remaining mass evenly (exact when k = vocabulary). Methods kd/seqkd. With "
        "student-generated data (GKD, DistiLLM) it serves the fixed-data micro-batches and the teacher stays loaded "
        "for the student's samples.")
    # Student-generated data (GKD / DistiLLM; minillm.trainers.student_data). Method kd or seqkd only.
    on_policy_fraction: float = _f(
        0.0, "GKD lambda: probability (seeded, the same coin on every rank) that a micro-batch's responses are replaced "
        "by responses the student samples for the same prompts; the same KD loss then runs on the sampled tokens "
        "(labels = sampled tokens incl. EOS, prompt masked). 0: fixed data only (bitwise the plain kd/seqkd run).")
    adaptive_off_policy: bool = _f(
        False, "DistiLLM's adaptive off-policy schedule: the probability of student-generated data starts at "
        "adaptive_init and rises by adaptive_step whenever the dev loss exceeds the loss at the last raise by "
        "adaptive_loss_eps; fresh samples go to a replay buffer that is reused (replay_ratio). Needs evaluation.")
    adaptive_init: float = _f(0.0, "Initial probability of student-generated data (DistiLLM --init-threshold).")
    adaptive_step: float = _f(0.1, "Increase of that probability on a dev-loss rise (DistiLLM: 0.1, capped at 1).")
    adaptive_loss_eps: float = _f(0.1, "Dev-loss rise that triggers an increase (DistiLLM --loss-eps).")
    replay_capacity: int = _f(1000, "Sequences the replay buffer holds per rank, oldest evicted first (DistiLLM "
                              "--capacity).")
    replay_ratio: Literal["decreasing", "constant", "increasing"] = _f(
        "decreasing", "Share of the student-data probability spent on fresh samples (the rest replays the buffer "
        "once it is full): decreasing 1 - step/total, constant 0.5, increasing step/total (DistiLLM --replay-ratio).")
    student_max_new_tokens: int = _f(-1, "Response length limit of student samples (-1: data.max_length - "
                                     "data.max_prompt_length).")
    student_temperature: float = _f(1.0, "Sampling temperature of student samples.")
    student_top_k: int = _f(0, "Top-k filter of student samples: must stay 0 (on-policy data; see config checks).")
    student_top_p: float = _f(1.0, "Nucleus filter of student samples: must stay 1.0.")


@dataclass
class EvalConfig:
    """Dev evaluation during training: loss and Rouge-L of sampled answers."""

    batch_size: int = _f(8, "Prompts per generation batch.")
    max_new_tokens: int = _f(256, "Tokens generated per dev prompt.")
    num_prompts: int = _f(-1, "Dev prompts used for Rouge-L (-1: all).")
    rouge: bool = _f(True, "Generate and compute Rouge-L (False: dev loss only).")
    do_sample: bool = _f(True, "Sample (True) or decode greedily.")
    temperature: float = _f(1.0, "Sampling temperature.")
    top_k: int = _f(0, "Top-k filter (0: off).")
    top_p: float = _f(1.0, "Nucleus filter (1.0: off).")
    seed: int = _f(10, "Generation seed, so dev Rouge-L is comparable across evaluations.")
    engine: Literal["auto", "hf", "fast"] = _f(
        "auto", "Sampler of the sft/kd/seqkd dev answers: hf (transformers generate), fast (minillm.generation.engine with the "
        "student alone: static caches and CUDA graphs on CUDA), auto (fast on CUDA, hf on CPU). Same distribution, "
        "different random streams: compare dev Rouge-L only within one engine. method minillm samples its dev "
        "answers with rollout.engine at alpha 0.")


@dataclass
class RolloutConfig:
    """Sampling of responses during MiniLLM training. Used by ``minillm.generation.rollout``."""

    num_rollouts: int = _f(256, "Responses sampled per rollout phase, over all ranks.")
    chunk_size: int = _f(16, "Prompts per generation batch on one rank.")
    max_new_tokens: int = _f(256, "Response length limit (reference: max_length - max_prompt_length).")
    teacher_mix_alpha: float = _f(0.2, "alpha of the teacher-mixed sampling distribution (1-a)*q + a*p (0: pure student).")
    temperature: float = _f(1.0, "Sampling temperature (applied to both models, as the reference).")
    top_k: int = _f(0, "Must stay 0: scoring and learning use the temperature-scaled distributions only.")
    top_p: float = _f(1.0, "Must stay 1.0 (as top_k).")
    do_sample: bool = _f(True, "Draw y_t ~ p̃ (the method). False takes argmax p̃ per token: deterministic rollouts "
                         "for debugging and for comparing strategies, not for training.")
    engine: Literal["naive", "fast", "speculative"] = _f(
        "fast", "fast = minillm.generation.engine (one shared Bernoulli(alpha) coin per step picks the model that draws the "
        "token; the teacher runs only on its steps; exact p~ per sequence, rows of a batch share the coins); "
        "speculative = minillm.generation.speculative (the student drafts rollout.draft_tokens tokens, the teacher verifies "
        "them in one forward; exact p~ with independent rows; eager only); naive = both models every step "
        "(minillm.generation.sampling). fast and naive draw identical tokens when alpha is 0 or 1.")
    draft_tokens: int = _f(4, "speculative engine: student draft tokens per teacher verification forward.")
    cuda_graphs: bool = _f(True, "fast engine on CUDA: static KV caches and CUDA-graph decode steps (torch.compile).")


@dataclass
class MiniLLMConfig:
    """The reverse-KL policy-gradient objective. Defaults reproduce the official implementation;
    the switches give the paper's equations and the ablations. Used by ``minillm.trainers.minillm``."""

    ppo_epochs: int = _f(4, "Passes over each rollout buffer.")
    clip_ratio: float = _f(0.2, "PPO clip epsilon on the ratio q_theta/q_old * w.")
    reward_scale: float = _f(0.5, "r_t = (log p - log q_old) / reward_scale.")
    reward_clip: float = _f(100.0, "Rewards are clipped to +-reward_clip.")
    reward_teacher_temperature: Literal["rollout", "one"] = _f(
        "rollout", "Temperature of the teacher's log-prob in the reward r_t: rollout = rollout.temperature, as the "
        "student's log q_old (the reward is the log-ratio of the distributions the weights and the single-step KL "
        "use); one = T = 1 whatever rollout.temperature, as the official code's reward_fn. Equal at T = 1.")
    gamma: float = _f(0.95, "Discount of the long-range return (paper: 1).")
    length_norm: bool = _f(True, "Divide returns by the number of tokens summed (paper ablation: off).")
    include_current: bool = _f(True, "Return includes r_t (reference) or starts at t+1 (paper).")
    whiten: Literal["global", "masked", "none"] = _f(
        "global", "Advantage whitening: global = over every entry incl. padding, all ranks (reference); "
        "masked = valid tokens only; none.")
    single_step: bool = _f(True, "Add the exact single-step KL term (paper ablation: off).")
    single_step_weighted: bool = _f(False, "Multiply the single-step term by the importance weight w_t (paper eq. 7).")
    ptx_coef: float = _f(1.0, "Weight of the pre-training loss (needs data.pretrain; 0: off).")
    pt_kd_ratio: float = _f(0.5, "PT loss = (1 - r)*CE + r*word-level KD from the teacher on the corpus.")
    pt_micro_batch_size: int = _f(-1, "Pre-training sequences per micro-step (-1: train.micro_batch_size).")
    pt_teacher_cache: Optional[str] = _f(
        None, "A teacher top-k cache of data.pretrain (minillm-teacher-cache): the PT loss's KD half reads the "
              "teacher's distributions from it instead of running the teacher (top-k kept, the tail mass spread "
              "evenly over the rest; exact when k = V).")
    dev_reverse_kl: bool = _f(True, "Log the length-normalised k3 reverse-KL estimate on dev samples.")
    chunked_losses: bool = _f(True, "Vocabulary-wide terms (token log-probs, single-step KL, PT loss, scoring) from "
                              "hidden states + LM head, loss_chunk_size positions at a time (no [B, L, V] fp32 "
                              "logits of both models); equal to the plain path to fp32 rounding.")
    loss_chunk_size: int = _f(1024, "Token positions per chunk of the chunked losses.")
    reuse_teacher: bool = _f(True, "Keep the teacher's hidden states over each rollout from scoring and reuse them in "
                             "every PPO epoch's single-step term (only the teacher's LM head runs), instead of "
                             "re-running the teacher at each micro-step. Exact; needs chunked_losses; costs "
                             "B x L x H_teacher values per rank.")
    # The paper's alternatives to the policy-gradient objective (slides "Without PPO?").
    long_range: bool = _f(True, "Add the PPO-clipped long-range policy-gradient term. false + single_step: the "
                          "word-level single-step reverse KL on student samples only (paper alternative #1).")
    objective: Literal["pg", "ranking", "opd"] = _f(
        "pg", "pg: the policy-gradient objective above. ranking (paper alternative #2): two student samples per "
        "prompt, y+/y- = the one the teacher scores higher/lower, loss max(0, ranking_margin - log q(y+) + "
        "log q(y-)) - ranking_anchor_coef * log q(y*); see losses.ranking_loss. opd: per-token on-policy "
        "distillation, the advantage of each sampled token A_t = log p(y_t) - log q_old(y_t) (discounted by "
        "opd_gamma, length-normalised with opd_length_norm; no reward scale, clip or whitening) in the same PPO "
        "term (clipped unless opd_clip=false), plus the single-step KL if minillm.single_step and the PT loss.")
    opd_gamma: float = _f(0.0, "opd: discount of the per-token advantage (0: A_t = log p - log q_old alone; 1: the "
                          "undiscounted sum of the remaining log-ratios).")
    opd_length_norm: bool = _f(False, "opd: divide the advantage by the number of tokens it sums (MiniLLM's "
                               "length normalisation).")
    opd_clip: bool = _f(True, "opd: clip the PPO ratio at 1 +- clip_ratio (false: the plain importance-weighted "
                        "policy gradient).")
    ranking_margin: float = _f(1.0, "delta of the ranking loss (in nats of sequence log-likelihood).")
    ranking_anchor_coef: float = _f(1.0, "lambda of the ranking loss: weight of -log q(y*).")
    ranking_anchor: Literal["reference", "best"] = _f(
        "reference", "y*: reference = the training record's response (the teacher's sample when data.train is "
        "a SeqKD file); best = y+, the teacher-preferred student sample.")
    ranking_length_norm: bool = _f(False, "Per-token means instead of sums for the teacher score and the "
                                   "student log-likelihoods of the ranking loss.")


@dataclass
class LoggingConfig:
    log_interval: int = _f(10, "Write metrics every N optimizer steps.")
    progress_bar: bool = _f(True, "tqdm bar on rank 0.")
    tensorboard: bool = _f(False, "Also log to TensorBoard under output_dir/tensorboard.")
    wandb: bool = _f(False, "Also log to Weights & Biases (key from WANDB_API_KEY).")
    wandb_project: str = _f("minillm", "W&B project.")
    wandb_run_name: Optional[str] = _f(None, "W&B run name (default: the output_dir name).")


@dataclass
class RunConfig:
    """The whole run. One YAML file mirrors it; see configs/ for examples."""

    method: Method = _f("sft", "sft | kd | seqkd | minillm.")
    output_dir: str = _f("runs/x", "Where config.yaml, metrics.jsonl, checkpoints/ and best/final go.")
    seed: int = _f(10, "Global seed (each rank adds its rank).")
    student: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "The model being trained."})
    teacher: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "The frozen teacher (unused by sft)."})
    teachers: list[TeacherConfig] = _f([], "Several frozen teachers, each training record routed to one by `routing:` "
                                       "(minillm, kd, seqkd; instead of `teacher:`): a list of {name, path, tokenizer, "
                                       "dtype, trust_remote_code, revision}.")
    routing: RoutingConfig = field(default_factory=RoutingConfig, metadata={"doc": "Record -> teacher (`teachers:`)."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "Data."})
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig, metadata={"doc": "Training loop."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"doc": "Optimizer and schedule."})
    strategy: StrategyConfig = field(default_factory=StrategyConfig, metadata={"doc": "Devices and DeepSpeed."})
    kd: KDConfig = field(default_factory=KDConfig, metadata={"doc": "Word-level KD."})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"doc": "MiniLLM sampling."})
    minillm: MiniLLMConfig = field(default_factory=MiniLLMConfig, metadata={"doc": "MiniLLM objective."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"doc": "Dev evaluation."})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"doc": "Metrics and trackers."})

    # ------------------------------------------------------------------ derived values and checks
    def resolve(self, world_size: int = 1, source: str = "<config>") -> "RunConfig":
        """Check cross-field constraints and fill derived values, before any model is loaded."""

        from .config_checks import (check_minillm_objective, check_student_data, check_teacher_server,
                                    check_teachers, check_train_sources)

        def fail(key: str, msg: str) -> None:
            raise ConfigError(f"{source}: `{key}`: {msg}")

        if world_size < 1:
            fail("world size", f"must be >= 1, got {world_size}")
        if not self.student.path:
            fail("student.path", "is required (a hub id or a local model folder)")
        check_train_sources(self, fail)
        check_teachers(self, fail)
        if self.method in ("kd", "seqkd", "minillm") and not self.teacher.path and not self.teachers:
            fail("teacher.path", f"is required for method `{self.method}`")
        self.student.peft.check("student.peft", fail)
        for key, t in [("teacher", self.teacher)] + [(f"teachers[{i}]", t) for i, t in enumerate(self.teachers)]:
            if t.peft.method != "none":
                fail(f"{key}.peft.method", "a teacher is frozen: give its adapter folder as its path instead")
        d, t, o = self.data, self.train, self.optim
        if d.max_prompt_length <= 0 or d.max_length <= d.max_prompt_length:
            fail("data.max_length", f"must exceed data.max_prompt_length ({d.max_length} <= {d.max_prompt_length})")
        if t.micro_batch_size <= 0:
            fail("train.micro_batch_size", "must be positive")
        per_step = t.micro_batch_size * world_size
        if t.global_batch_size % per_step:
            fail("train.global_batch_size", f"{t.global_batch_size} is not a multiple of micro_batch_size x world "
                 f"size = {t.micro_batch_size} x {world_size}")
        accumulation = t.global_batch_size // per_step
        if t.gradient_accumulation_steps not in (-1, accumulation):
            fail("train.gradient_accumulation_steps", f"is derived ({accumulation} here); leave it at -1")
        t.gradient_accumulation_steps = accumulation
        if t.max_time:
            try:
                if parse_duration(t.max_time) <= 0:
                    raise ValueError
            except ValueError:
                fail("train.max_time", f"{t.max_time!r} is not a positive duration; write \"H:MM:SS\", "
                     "e.g. \"3:55:00\"")
        if t.max_steps == 0 or (t.max_steps < 0 and t.epochs <= 0):
            fail("train.max_steps", "set max_steps > 0 or epochs > 0")
        if not 0.0 <= self.kd.kd_ratio <= 1.0:
            fail("kd.kd_ratio", f"must be in [0, 1], got {self.kd.kd_ratio}")
        if len(o.betas) != 2:
            fail("optim.betas", f"needs two values, got {o.betas}")
        if o.lr <= 0:
            fail("optim.lr", "must be positive")
        s = self.strategy
        if s.zero_stage not in (0, 1, 2, 3):
            fail("strategy.zero_stage", f"must be 0, 1, 2 or 3, got {s.zero_stage}")
        if s.teacher_zero_stage not in (None, 0, 3):
            fail("strategy.teacher_zero_stage", "must be 0, 3 or null")
        if s.backend == "local" and world_size > 1:
            fail("strategy.backend", f"`local` runs one process but WORLD_SIZE={world_size}; use deepspeed")
        if s.sampling_copy and (s.backend != "local" or self.student.dtype != "bf16"):
            fail("strategy.sampling_copy", "applies to the local backend with student.dtype bf16 (fp32 weights under "
                 "autocast); DeepSpeed's bf16 mode already keeps bf16 weights. Set it to null or false")
        if s.backend == "local" and self.student.dtype == "fp16":
            fail("student.dtype", "fp16 training needs loss scaling: use bf16, or strategy.backend=deepspeed")
        if self.method == "minillm":
            r, m = self.rollout, self.minillm
            if r.num_rollouts % world_size:
                fail("rollout.num_rollouts", f"{r.num_rollouts} does not split evenly over {world_size} ranks")
            per_rank = r.num_rollouts // world_size
            if per_rank % t.micro_batch_size:
                fail("rollout.num_rollouts", f"{per_rank} rollouts per rank are not a multiple of "
                     f"train.micro_batch_size={t.micro_batch_size}")
            if (per_rank // t.micro_batch_size) % accumulation:
                fail("train.global_batch_size", f"one rollout phase gives {per_rank // t.micro_batch_size} "
                     f"micro-batches per rank, not a multiple of the {accumulation} accumulation steps")
            if not 0.0 <= r.teacher_mix_alpha <= 1.0:
                fail("rollout.teacher_mix_alpha", "must be in [0, 1]")
            if r.top_k != 0 or r.top_p != 1.0:
                # The samplers would draw from the filtered mixture, but the importance weights, rewards, PPO ratio
                # and single-step KL score the temperature-only distributions: the estimator would be biased.
                fail("rollout.top_k" if r.top_k != 0 else "rollout.top_p",
                     "MiniLLM scores rollouts (importance weights, rewards, PPO ratio, single-step KL) under the "
                     "temperature-scaled distributions only, so rollouts drawn through a top-k/top-p filter would "
                     "make every one of those terms refer to a distribution that was not sampled. Leave "
                     "rollout.top_k=0 and rollout.top_p=1.0 (rollout.temperature is exact); evaluation's eval.top_k "
                     "/ eval.top_p are unaffected")
            if r.draft_tokens < 1:
                fail("rollout.draft_tokens", f"must be >= 1 (student tokens per teacher verification), got "
                     f"{r.draft_tokens}")
            if d.max_prompt_length + r.max_new_tokens > d.max_length:
                fail("rollout.max_new_tokens", f"max_prompt_length + max_new_tokens = "
                     f"{d.max_prompt_length + r.max_new_tokens} exceeds data.max_length={d.max_length}")
            if m.ppo_epochs < 1:
                fail("minillm.ppo_epochs", "must be >= 1")
            if m.reward_scale <= 0:
                fail("minillm.reward_scale", "must be positive")
            if m.pt_teacher_cache is not None and (d.pretrain is None or m.ptx_coef <= 0 or m.pt_kd_ratio <= 0):
                fail("minillm.pt_teacher_cache", "is only read by the PT loss's KD half: it needs data.pretrain, "
                     "minillm.ptx_coef > 0 and minillm.pt_kd_ratio > 0")
        check_student_data(self, fail)
        check_teacher_server(self, fail)
        check_minillm_objective(self, fail, world_size)
        if self.eval.batch_size <= 0:
            fail("eval.batch_size", "must be positive")
        if t.select_best_by == "rougeL" and not self.eval.rouge and t.eval_interval != 0:
            fail("train.select_best_by", "is rougeL but eval.rouge is false, so no dev Rouge-L is computed; "
                 "set train.select_best_by=loss (or none), or eval.rouge=true")
        if t.select_best_by == "loss" and self.method == "minillm":
            fail("train.select_best_by", "MiniLLM evaluation samples from the student and has no dev loss; "
                 "use rougeL (the reference) or none")
        return self


def shipped_config_dir() -> Path:
    """The folder of shipped recipes: $MINILLM_CONFIG_DIR, else the repository's configs/."""
    env = os.environ.get("MINILLM_CONFIG_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "configs"


def find_config(name: str) -> Path:
    """A path, or the name of a shipped config: ``opt-1.3b.yaml`` or ``sft/opt-1.3b.yaml``.

    A bare name is looked up in configs/minillm/ first (the main method), then in every other
    folder; a bare name found in several non-minillm folders is ambiguous and fails.
    """
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.is_absolute() or name.startswith((".", "~")):  # a path, not a shipped name: nothing to look up
        raise ConfigError(f"config file `{name}` does not exist")
    root = shipped_config_dir()
    if (root / name).is_file():
        return root / name
    candidates = [root / "minillm" / name] if (root / "minillm" / name).is_file() else sorted(root.rglob(name))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ConfigError(f"config `{name}`: no such file, and no shipped config of that name under {root}")
    listed = ", ".join(str(c.relative_to(root)) for c in candidates)
    raise ConfigError(f"config `{name}` is ambiguous: {listed}; give the folder, e.g. `{candidates[0].relative_to(root)}`")


def load_config(name: str | None = None, overrides: list[str] | None = None,
                world_size: int | None = None, resolve: bool = True) -> RunConfig:
    """Load a YAML file (path or shipped name), apply overrides, check types and derived values."""
    data: dict = {}
    source = "<overrides>"
    if name is not None:
        path = find_config(name)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ConfigError(f"{source}: cannot read: {e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: invalid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
        data = loaded
    data = apply_overrides(data, list(overrides or []))
    cfg = from_dict(RunConfig, data, source)
    if resolve:
        ws = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
        cfg.resolve(ws, source)
    return cfg


def explain(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """One line per field: dotted key, default and its documentation."""
    lines = []
    for f in dataclasses.fields(cls):
        hints = typing.get_type_hints(cls)
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"[{key}] {f.metadata.get('doc', '')}")
            lines.extend(explain(hints[f.name], key + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {key} = {default!r}: {f.metadata.get('doc', '')}")
    return lines
