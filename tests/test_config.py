"""Config tree: precedence, strictness, derived values, shipped configs."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from minillm.config import ConfigError, RunConfig, find_config, load_config, shipped_config_dir, to_dict, to_yaml

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path, text, name="run.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_precedence_defaults_yaml_overrides(tmp_path):
    p = write(tmp_path, "student: {path: s}\noptim: {lr: 5e-6, warmup_steps: 7}\ntrain: {micro_batch_size: 4}\n")
    cfg = load_config(str(p), ["optim.lr=1e-5", "train.global_batch_size=16"], world_size=1)
    assert cfg.optim.lr == 1e-5  # override beats YAML
    assert cfg.optim.warmup_steps == 7  # YAML beats default
    assert cfg.optim.weight_decay == RunConfig().optim.weight_decay  # default kept
    assert isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 5e-6 as a string; it is coerced
    assert cfg.train.gradient_accumulation_steps == 4  # 16 / (4 x 1)


def test_overrides_produce_exact_typed_values():
    """Command-line overrides are YAML scalars coerced to each field's declared type: the exact value and type,
    never a string, and an int is not silently a bool (or a float an int)."""
    cfg = load_config(None, ["student.path=s", "optim.lr=3e-4", "train.max_steps=7", "student.gradient_checkpointing=true",
                             "eval.top_p=1", "optim.betas=[0.8, 0.9]", "minillm.whiten=masked", "teacher.dtype=bf16",
                             "data.dev=null", "seed=3", "minillm.reward_clip=5", "eval.num_prompts=-1",
                             "train.epochs=2"], world_size=1)
    got = [cfg.optim.lr, cfg.train.max_steps, cfg.student.gradient_checkpointing, cfg.eval.top_p, cfg.optim.betas,
           cfg.minillm.whiten, cfg.teacher.dtype, cfg.data.dev, cfg.seed, cfg.minillm.reward_clip,
           cfg.eval.num_prompts, cfg.train.epochs]
    expected = [3e-4, 7, True, 1.0, [0.8, 0.9], "masked", "bf16", None, 3, 5.0, -1, 2]
    assert got == expected
    assert [type(v) for v in got] == [float, int, bool, float, list, str, str, type(None), int, float, int, int]
    assert [type(b) for b in cfg.optim.betas] == [float, float]
    # keys not overridden keep their defaults exactly
    assert cfg.optim.weight_decay == RunConfig().optim.weight_decay and cfg.minillm.gamma == RunConfig().minillm.gamma


def test_gradient_accumulation_derived_from_world_size(tmp_path):
    p = write(tmp_path, "student: {path: s}\nstrategy: {backend: deepspeed}\ntrain: {micro_batch_size: 2, global_batch_size: 32}\n")
    assert load_config(str(p), world_size=4).train.gradient_accumulation_steps == 4
    with pytest.raises(ConfigError, match=r"global_batch_size.*not a multiple"):
        load_config(str(p), world_size=3)


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "student: {path: s}\noptim: {learning_rate: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "optim.learning_rate" in str(e.value) and str(p) in str(e.value)


def test_wrong_type_names_key_and_file(tmp_path):
    p = write(tmp_path, "student: {path: s}\ntrain: {max_steps: ten}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "train.max_steps" in str(e.value) and "int" in str(e.value) and str(p) in str(e.value)
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(str(p), ["train.max_steps=5", "train.epochs=true"])  # a bool is not an int


def test_literal_choices_and_sections(tmp_path):
    p = write(tmp_path, "student: {path: s}\nmethod: ppo\n")
    with pytest.raises(ConfigError, match=r"`method` must be one of"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="is a section"):
        load_config(None, ["student=abc"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="teacher.path"):
        load_config(None, ["student.path=s", "method=kd"])
    with pytest.raises(ConfigError, match="student.path"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="max_length"):
        load_config(None, ["student.path=s", "data.max_length=100", "data.max_prompt_length=200"])
    with pytest.raises(ConfigError, match="kd_ratio"):
        load_config(None, ["student.path=s", "kd.kd_ratio=1.5"])
    with pytest.raises(ConfigError, match=r"rollout.draft_tokens.*>= 1"):
        load_config(None, ["student.path=s", "teacher.path=t", "method=minillm", "rollout.draft_tokens=0",
                           "data.train=x.jsonl"])
    with pytest.raises(ConfigError, match=r"rollout.engine.*speculative"):
        load_config(None, ["student.path=s", "rollout.engine=turbo"])
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        load_config(None, ["student.path=s", "train.gradient_accumulation_steps=3"])
    with pytest.raises(ConfigError, match=r"select_best_by.*eval.rouge is false"):
        load_config(None, ["student.path=s", "eval.rouge=false"])
    assert load_config(None, ["student.path=s", "eval.rouge=false", "train.select_best_by=loss"]).eval.rouge is False
    with pytest.raises(ConfigError, match=r"select_best_by.*no dev loss"):
        load_config("configs/tiny/minillm.yaml", ["train.select_best_by=loss"])


def test_on_policy_methods_refuse_sampling_filters_they_cannot_score():
    """Rollout top-k/top-p would make MiniLLM's weights, rewards, ratio and single-step KL refer to a distribution
    that was not sampled; GKD/DistiLLM samples would be off-policy. Each is refused naming the key and why."""
    for key, value in (("rollout.top_k", 50), ("rollout.top_p", 0.9)):
        with pytest.raises(ConfigError, match=rf"`{key}`.*not sampled"):
            load_config("configs/tiny/minillm.yaml", [f"{key}={value}"])
    for recipe in ("gkd", "distillm"):
        for key, value in (("kd.student_top_k", 50), ("kd.student_top_p", 0.9)):
            with pytest.raises(ConfigError, match=rf"`{key}`.*off-policy"):
                load_config(f"configs/tiny/{recipe}.yaml", [f"{key}={value}"])
    # what stays allowed: temperatures, evaluation's filters, and filters of a KD run without student samples
    load_config("configs/tiny/minillm.yaml", ["rollout.temperature=0.7", "eval.top_k=50", "eval.top_p=0.9"])
    load_config("configs/tiny/gkd.yaml", ["kd.student_temperature=0.7"])
    load_config("configs/tiny/kd.yaml", ["kd.student_top_k=50"])


def test_ranking_refuses_shared_coins():
    """The fast engine's per-step coins are shared by a batch: a ranking pair with 0 < α < 1 would be correlated."""
    with pytest.raises(ConfigError, match=r"`rollout.teacher_mix_alpha`.*same steps"):
        load_config("configs/tiny/minillm-ranking.yaml", ["rollout.teacher_mix_alpha=0.2", "rollout.engine=fast"])
    for engine in ("naive", "speculative"):  # independent rows
        load_config("configs/tiny/minillm-ranking.yaml", ["rollout.teacher_mix_alpha=0.2", f"rollout.engine={engine}"])
    load_config("configs/tiny/minillm-ranking.yaml", ["rollout.teacher_mix_alpha=0", "rollout.engine=fast"])


def test_invalid_yaml_and_missing_file(tmp_path):
    p = write(tmp_path, "student: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="no shipped config"):
        load_config("does-not-exist.yaml")


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["student.path=s", "method=kd", "teacher.path=t", "optim.betas=[0.9, 0.95]"])
    again = load_config(str(write(tmp_path, to_yaml(cfg))))
    assert again == cfg


def test_shipped_config_lookup_by_name():
    root = shipped_config_dir()
    assert find_config("tiny/sft.yaml") == root / "tiny" / "sft.yaml"
    assert find_config("sft.yaml") == root / "tiny" / "sft.yaml"  # unique bare name


def all_shipped_configs():
    """Every training recipe (configs/eval/ holds minillm-eval configs, checked in tests/test_eval_cli.py)."""
    root = REPO / "configs"
    return sorted(p for p in root.rglob("*.yaml") if p.relative_to(root).parts[0] != "eval")


@pytest.mark.parametrize("path", all_shipped_configs(), ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_config_validates(path):
    text = path.read_text()
    assert text.lstrip().startswith("#"), f"{path}: configs are headed by the command that runs them"
    load_config(str(path), world_size=1)


def test_cli_dry_run_prints_resolved_yaml_without_loading_a_model():
    out = subprocess.run([sys.executable, "-m", "minillm.cli.train", "--config", "configs/tiny/kd.yaml",
                          "--dry-run", "train.max_steps=3", "student.path=/nonexistent/model"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["train"]["max_steps"] == 3
    assert resolved["train"]["gradient_accumulation_steps"] == 2
    assert resolved["student"]["path"] == "/nonexistent/model"  # never loaded
    # every value printed is the value training would use: the whole tree equals load_config's, typed
    expected = to_dict(load_config("configs/tiny/kd.yaml", ["train.max_steps=3", "student.path=/nonexistent/model"],
                                   world_size=1))
    assert resolved == expected


def test_cli_config_error_exit_code():
    out = subprocess.run([sys.executable, "-m", "minillm.cli.train", "--config", "configs/tiny/kd.yaml",
                          "--dry-run", "optim.nope=1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "optim.nope" in out.stderr and "configs/tiny/kd.yaml" in out.stderr


def test_import_minillm_does_not_import_deepspeed():
    code = ("import sys, minillm, minillm.config, minillm.trainers, minillm.strategy, minillm.losses; "
            "print('deepspeed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_distillm_recipes_follow_distillm():
    """DistiLLM's adaptive schedule takes its baseline dev loss before any training step (its finetune() evaluates
    at step 0); without train.eval_at_start ours would take the first dev loss after an epoch of training. Its
    scripts start from an SFT init, add the LM loss on the corpus, and use SFKL for GPT-2 base."""
    from pathlib import Path

    recipes = sorted(Path("configs/distillm").glob("*.yaml"))
    assert recipes
    for path in recipes:
        cfg = load_config(str(path))
        assert cfg.kd.adaptive_off_policy and cfg.train.eval_at_start, path
        # DistiLLM starts from an SFT init (its init_*.sh) and adds the LM loss on the pre-training corpus
        assert cfg.student.path == f"runs/sft-init/{path.stem}/best", path
        assert cfg.kd.ptx_coef == 1.0 and cfg.data.pretrain, path
    # its GPT-2 base script uses adaptive SFKL, medium and large adaptive SRKL
    assert load_config("configs/distillm/gpt2-base.yaml").kd.divergence == "sfkl"
    assert load_config("configs/distillm/gpt2-medium.yaml").kd.divergence == "srkl"


def test_a_missing_absolute_config_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("./missing.yaml")


def test_resume_auto_starts_fresh_without_a_checkpoint_and_resumes_with_one(tmp_path):
    from minillm.checkpoint import resolve_resume_dir

    assert resolve_resume_dir("auto", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume_dir(None, tmp_path)  # plain --resume keeps its strict meaning
    (tmp_path / "checkpoints" / ".tmp-step-8").mkdir(parents=True)  # a save that never completed
    assert resolve_resume_dir("auto", tmp_path) is None
    for step in (4, 12):
        folder = tmp_path / "checkpoints" / f"step-{step}"
        folder.mkdir()
        (folder / "trainer_state.pt").write_bytes(b"")
    assert resolve_resume_dir("auto", tmp_path) == tmp_path / "checkpoints" / "step-12"
    assert resolve_resume_dir(None, tmp_path) == tmp_path / "checkpoints" / "step-12"
