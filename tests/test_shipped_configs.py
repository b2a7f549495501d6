"""The shipped paper recipes (configs/sft, kd, seqkd, minillm): they validate at 1 and 8 ranks, chain into each
other (teachers and MiniLLM students are SFT outputs) and carry the reference hyperparameters of
lmops-notes §2.9 (MiniLLM) and §4 (baselines)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from minillm.config import RunConfig, find_config, load_config, shipped_config_dir

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
FOLDERS = ("sft", "kd", "seqkd", "minillm")
TEACHER_OF = {"gpt2": "gpt2-xl", "opt": "opt-13b", "llama": "llama-13b"}
HUB = {"gpt2-base": "gpt2", "gpt2-medium": "gpt2-medium", "gpt2-large": "gpt2-large", "gpt2-xl": "gpt2-xl",
       "opt-1.3b": "facebook/opt-1.3b", "opt-2.7b": "facebook/opt-2.7b", "opt-6.7b": "facebook/opt-6.7b",
       "opt-13b": "facebook/opt-13b", "llama-7b": "huggyllama/llama-7b", "llama-13b": "huggyllama/llama-13b"}

# lmops-notes §4, per script: (lr, epochs, gradient checkpointing). Every reference baseline launch has a global
# batch of 32 (micro x GA x 16 GPUs / TP).
SFT_REF = {
    "gpt2-base": (5e-4, 20, False), "gpt2-medium": (1e-4, 20, False), "gpt2-large": (1e-4, 10, False),
    "gpt2-xl": (5e-5, 10, False), "opt-1.3b": (5e-5, 10, False), "opt-2.7b": (5e-5, 10, False),
    "opt-6.7b": (1e-5, 10, True), "opt-13b": (1e-5, 10, True), "llama-7b": (1e-5, 10, True),
    "llama-13b": (1e-5, 10, True),
}
KD_REF = {
    "gpt2-base": (5e-4, 20, False), "gpt2-medium": (1e-4, 20, False), "gpt2-large": (1e-4, 10, False),
    "opt-1.3b": (5e-5, 10, True), "opt-2.7b": (5e-5, 10, True), "opt-6.7b": (1e-5, 10, True),
    "llama-7b": (1e-5, 10, True),
}
# lmops-notes §2.9, per script: (rollouts per phase, global batch, optimizer steps per phase, scheduler).
# Steps per phase = ppo_epochs x (rollouts per data-parallel rank / micro-batch) / GA, e.g. gpt2-medium on
# 16 GPUs: 4 x (256/16 / 2) / 2 = 16; OPT-1.3B under TP 4: 4 x (256//16 / 16) / 1 = 4 on 64 rollouts.
MINILLM_REF = {
    "gpt2-base": (256, 256, 4, "constant"), "gpt2-medium": (256, 64, 16, "constant"),
    "gpt2-large": (256, 64, 16, "constant"), "opt-1.3b": (64, 64, 4, "constant"),
    "opt-2.7b": (64, 64, 4, "constant"), "opt-6.7b": (64, 64, 4, "constant"),
    "llama-7b": (64, 64, 4, "cosine"), "qwen2.5-1.5b": (64, 64, 4, "cosine"),
    "llama-7b-lora": (64, 64, 4, "cosine"),  # llama-7b with a LoRA student (student.peft)
}
EXPECTED = {"sft": set(SFT_REF), "kd": set(KD_REF), "seqkd": set(KD_REF), "minillm": set(MINILLM_REF)}


def recipes() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (CONFIGS / folder).glob("*.yaml"))


def family(name: str) -> str:
    return name.split("-")[0]


def header(path: Path) -> str:
    """The leading comment block of a config file."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def load(folder: str, name: str, world_size: int = 8) -> RunConfig:
    return load_config(str(CONFIGS / folder / f"{name}.yaml"), world_size=world_size)


def test_every_recipe_ships_and_nothing_else():
    for folder, names in EXPECTED.items():
        assert {p.stem for p in (CONFIGS / folder).glob("*") if p.is_file()} == names, folder
    # the paper-era MiniLLM variants (tested below) and nothing else in a subfolder
    assert {p.relative_to(CONFIGS).as_posix() for folder in EXPECTED for p in (CONFIGS / folder).glob("*/*")} == {
        f"minillm/paper/{n}.yaml" for n in ("gpt2-base", "gpt2-medium", "gpt2-large", "opt-1.3b", "opt-2.7b",
                                             "opt-6.7b", "llama-7b")}


@pytest.mark.parametrize("path", recipes(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_recipe_validates_at_1_and_8_ranks(path):
    folder, name = path.parent.name, path.stem
    one, eight = load_config(str(path), world_size=1), load_config(str(path), world_size=8)
    for cfg in (one, eight):
        assert cfg.method == folder
        assert cfg.output_dir == f"runs/{folder}/{name}"
        assert cfg.strategy.backend == "deepspeed"
        assert (cfg.data.max_prompt_length, cfg.data.max_length) == (256, 512)
        assert cfg.seed == 10
        if folder != "sft":
            assert cfg.teacher.path, f"{path}: method {folder} needs a teacher"
    # The global batch is fixed; gradient accumulation absorbs the number of ranks.
    t1, t8 = one.train, eight.train
    assert t1.global_batch_size == t8.global_batch_size
    assert t1.gradient_accumulation_steps == 8 * t8.gradient_accumulation_steps
    assert t8.micro_batch_size * 8 * t8.gradient_accumulation_steps == t8.global_batch_size
    # Headed by the exact launch command, naming this very file.
    head = header(path)
    assert head, f"{path}: configs are headed by the command that runs them"
    assert f"deepspeed --num_gpus 8 -m minillm.cli.train --config configs/{folder}/{name}.yaml" in head
    for named in re.findall(r"--config (\S+)", head):
        assert (REPO / named).resolve() == path.resolve()


@pytest.mark.parametrize("name", sorted(SFT_REF))
def test_sft_recipes_carry_reference_values(name):
    cfg = load("sft", name)
    lr, epochs, ckpt = SFT_REF[name]
    o, t = cfg.optim, cfg.train
    assert cfg.student.path == HUB[name]
    assert (o.lr, t.epochs, cfg.student.gradient_checkpointing) == (lr, epochs, ckpt)
    assert (o.scheduler, o.warmup_steps, o.min_lr, o.weight_decay, o.betas, o.clip_grad) == (
        "cosine", 0, 1e-7, 0.01, [0.9, 0.999], 1.0)
    assert (t.global_batch_size, t.max_steps, t.eval_interval, t.save_interval) == (32, -1, -1, -1)
    assert cfg.data.train == "dolly" and cfg.data.dev is None and cfg.data.dev_num == 1000
    assert cfg.student.dtype == "fp16"
    # Teachers are picked by Rouge-L; student-size SFT runs are MiniLLM initialisations, picked by dev loss.
    is_teacher = name in TEACHER_OF.values()
    assert t.select_best_by == ("rougeL" if is_teacher else "loss")
    assert cfg.strategy.zero_stage in ((3,) if name.endswith("13b") else (1, 2))


@pytest.mark.parametrize("method", ["kd", "seqkd"])
@pytest.mark.parametrize("name", sorted(KD_REF))
def test_kd_and_seqkd_recipes_carry_reference_values(method, name):
    cfg = load(method, name)
    lr, epochs, ckpt = KD_REF[name]
    o, t = cfg.optim, cfg.train
    teacher = TEACHER_OF[family(name)]
    assert cfg.student.path == HUB[name]  # from the pre-trained model, not the SFT init (lmops-notes §4)
    assert (o.lr, t.epochs, cfg.student.gradient_checkpointing) == (lr, epochs, ckpt)
    assert (o.scheduler, o.warmup_steps, o.min_lr, o.weight_decay, o.betas) == ("cosine", 0, 1e-7, 0.01, [0.9, 0.999])
    assert (t.global_batch_size, t.eval_interval, t.save_interval, t.select_best_by) == (32, -1, -1, "rougeL")
    assert (cfg.kd.kd_ratio, cfg.kd.divergence, cfg.kd.temperature) == (0.5, "fkl", 1.0)
    assert cfg.teacher.path == f"runs/sft/{teacher}/best"
    assert cfg.teacher.dtype == cfg.student.dtype == "fp16"
    if method == "kd":
        assert cfg.data.train == "dolly"
    else:
        assert cfg.data.train == f"runs/seqkd-data/{teacher}/train.jsonl"
        generate = (f"minillm-generate --model runs/sft/{teacher}/best --data dolly "
                    f"--output {cfg.data.train}")
        assert generate in header(CONFIGS / method / f"{name}.yaml")


@pytest.mark.parametrize("name", sorted(MINILLM_REF))
def test_minillm_recipes_carry_reference_values(name):
    cfg = load("minillm", name)
    o, t, r, m = cfg.optim, cfg.train, cfg.rollout, cfg.minillm
    rollouts, global_batch, _, scheduler = MINILLM_REF[name]
    assert (o.lr, o.scheduler, o.warmup_steps, o.betas, o.weight_decay, o.clip_grad) == (
        5e-6, scheduler, 100, [0.9, 0.95], 1e-6, 1.0)
    if scheduler == "cosine":
        assert o.min_lr == 0.0  # HF cosine_with_warmup decays to 0
    assert (t.max_steps, t.epochs, t.eval_interval, t.save_interval, t.select_best_by) == (
        5000, 10, 100, 500, "rougeL")
    assert (r.num_rollouts, t.global_batch_size) == (rollouts, global_batch)
    assert (r.max_new_tokens, r.teacher_mix_alpha, r.temperature, r.top_k, r.top_p) == (256, 0.2, 1.0, 0, 1.0)
    assert cfg.data.max_prompt_length + r.max_new_tokens == cfg.data.max_length
    assert (m.ppo_epochs, m.clip_ratio, m.reward_scale, m.reward_clip, m.gamma) == (4, 0.2, 0.5, 100.0, 0.95)
    assert (m.length_norm, m.include_current, m.whiten, m.single_step, m.single_step_weighted) == (
        True, True, "global", True, False)
    assert (m.ptx_coef, m.pt_kd_ratio) == (1.0, 0.5)
    assert cfg.data.pretrain and cfg.data.pretrain.startswith(".cache/minillm/")
    assert cfg.data.pretrain_seq_length == 512
    assert cfg.data.train == "dolly"
    assert cfg.student.dtype == cfg.teacher.dtype == ("bf16" if name.startswith("qwen") else "fp16")


@pytest.mark.parametrize("world_size", [1, 8])
@pytest.mark.parametrize("name", sorted(MINILLM_REF))
def test_minillm_phase_accounting_matches_the_reference(name, world_size):
    """Optimizer steps per rollout phase (the trainer's formula) equal the reference's, and every generation
    batch is used whole (chunk_size divides the rank's rollouts, so no sampled prompt is thrown away)."""
    cfg = load("minillm", name, world_size)
    t, r = cfg.train, cfg.rollout
    per_rank = r.num_rollouts // world_size
    steps = cfg.minillm.ppo_epochs * (per_rank // t.micro_batch_size) // t.gradient_accumulation_steps
    assert steps == MINILLM_REF[name][2]
    assert per_rank % r.chunk_size == 0


@pytest.mark.parametrize("method", ["kd", "seqkd", "minillm"])
def test_teachers_and_students_are_shipped_sft_outputs(method):
    for path in sorted((CONFIGS / method).glob("*.yaml")):
        name = path.stem
        if name.startswith("qwen"):
            continue  # no Qwen SFT recipe ships; it points at hub instruct models
        cfg = load(method, name)
        teacher = TEACHER_OF[family(name)]
        teacher_sft = load("sft", teacher)
        assert cfg.teacher.path == f"{teacher_sft.output_dir}/best"
        assert teacher_sft.train.select_best_by == "rougeL"
        assert family(teacher) == family(name)  # one tokenizer per family
        if method == "minillm":
            student_sft = load("sft", name.removesuffix("-lora"))
            assert cfg.student.path == f"{student_sft.output_dir}/best"
            assert student_sft.train.select_best_by == "loss"  # the reference picks init-* by dev loss


def test_bare_name_resolves_to_the_minillm_recipe():
    root = shipped_config_dir()
    assert find_config("opt-1.3b.yaml").resolve() == (root / "minillm" / "opt-1.3b.yaml").resolve()
    assert find_config("sft/opt-1.3b.yaml").resolve() == (root / "sft" / "opt-1.3b.yaml").resolve()
    assert find_config("opt-13b.yaml").resolve() == (root / "sft" / "opt-13b.yaml").resolve()  # only in sft/
    assert load_config("gpt2-base.yaml", world_size=1).method == "minillm"


def test_cli_dry_run_of_a_bare_shipped_name():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "MINILLM_CONFIG_DIR")}
    out = subprocess.run([sys.executable, "-m", "minillm.cli.train", "--config", "opt-1.3b.yaml", "--dry-run"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["method"] == "minillm"
    assert resolved["student"]["path"] == "runs/sft/opt-1.3b/best"
    assert resolved["rollout"]["num_rollouts"] == 64
    assert resolved["train"]["gradient_accumulation_steps"] == 8  # 64 / (8 x 1 rank)


@pytest.mark.parametrize("name", ["gpt2-base", "gpt2-medium", "gpt2-large", "opt-1.3b", "opt-2.7b", "opt-6.7b",
                                  "llama-7b"])
def test_paper_era_minillm_recipes_differ_from_current_ones_only_in_batch_and_rollouts(name):
    """configs/minillm/paper/*: the published code's global batch 64 and 256 rollouts (16 optimizer steps per phase),
    everything else as the current-official recipe beside it."""
    from minillm.config import load_config, to_dict

    path = CONFIGS / "minillm" / "paper" / f"{name}.yaml"
    assert f"deepspeed --num_gpus 8 -m minillm.cli.train --config configs/minillm/paper/{name}.yaml" in header(path)
    paper = load_config(str(path), world_size=8)
    current = load_config(f"configs/minillm/{name}.yaml", world_size=8)
    assert (paper.train.global_batch_size, paper.rollout.num_rollouts) == (64, 256)
    per_rank_micro = paper.rollout.num_rollouts // 8 // paper.train.micro_batch_size
    assert paper.minillm.ppo_epochs * per_rank_micro // paper.train.gradient_accumulation_steps == 16
    a, b = to_dict(paper), to_dict(current)
    differ = {f"{section}.{key}" for section in a if isinstance(a[section], dict)
              for key in a[section] if a[section][key] != b[section][key]}
    differ |= {k for k in a if not isinstance(a[k], dict) and a[k] != b[k]}
    assert differ <= {"output_dir", "train.micro_batch_size", "train.global_batch_size",
                      "train.gradient_accumulation_steps", "rollout.num_rollouts"}, differ


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


# The paper's two MiniLLM alternatives (§3.3 / ablations, lmops-notes §2.9 for the rest): exactly these values
# differ from the MiniLLM recipe of the same model, whose reference values are asserted above.
VARIANTS = {
    "minillm-single-step": {"minillm.long_range": False, "rollout.teacher_mix_alpha": 0.0},
    "minillm-ranking": {"minillm.objective": "ranking", "rollout.teacher_mix_alpha": 0.0},
}


@pytest.mark.parametrize("folder", sorted(VARIANTS))
@pytest.mark.parametrize("name", sorted(set(MINILLM_REF) - {"llama-7b-lora"}))  # no LoRA variants ship
def test_minillm_variant_recipes_differ_from_minillm_exactly_in_their_switches(folder, name):
    from minillm.config import to_dict

    variant = load_config(str(CONFIGS / folder / f"{name}.yaml"), world_size=8)
    base = load(folder="minillm", name=name)
    a, b = _flat(to_dict(variant)), _flat(to_dict(base))
    assert a.keys() == b.keys()
    differ = {key: a[key] for key in a if a[key] != b[key]}
    assert differ == {"output_dir": f"runs/{folder}/{name}", **VARIANTS[folder]}
    if folder == "minillm-ranking":  # delta 1, lambda 1, anchored on the reference response (the header's J)
        m = variant.minillm
        assert (m.ranking_margin, m.ranking_anchor_coef, m.ranking_anchor) == (1.0, 1.0, "reference")
    assert f"--config configs/{folder}/{name}.yaml" in header(CONFIGS / folder / f"{name}.yaml")


def test_the_lora_recipe_is_llama_7b_with_lmops_adapter_settings():
    """configs/minillm/llama-7b-lora.yaml differs from llama-7b.yaml only in the adapter (LMOps'
    train_7B_13B_lora.sh: --peft lora with r 8, alpha 32, dropout 0.1 on peft's LLaMA default q_proj, v_proj) and
    its output folder."""
    from dataclasses import asdict

    lora, full = asdict(load("minillm", "llama-7b-lora")), asdict(load("minillm", "llama-7b"))
    peft = lora["student"].pop("peft")
    assert peft == {"method": "lora", "r": 8, "alpha": 32.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
                    "modules_to_save": [], "use_rslora": False}
    assert full["student"].pop("peft")["method"] == "none"
    assert lora.pop("output_dir") == "runs/minillm/llama-7b-lora" and full.pop("output_dir") == "runs/minillm/llama-7b"
    assert lora == full
