"""The demo pipeline: teacher data → SFT warm start → MiniLLM → evaluation of all three → report.

Every stage runs the library's own command-line tools in a subprocess (``minillm-generate``, ``minillm-train``,
``minillm-eval``), exactly as a user would, and is cached (see :mod:`minillm.demo.stages`).

    python -m minillm.demo                      # the full demo (~15 min on 2 CPU cores)
    python -m minillm.demo --profile quick      # 1.5-2.5 min
    python -m minillm.demo --profile tiny       # the committed test assets, no GGUF model (~30 s)
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from .profiles import Profile
from .stages import ProgressFilter, Stages, file_digest, python_module, run_command

STAGE_COUNT = 9
CALIBRATION_ANSWERS = 32  # teacher answers the `influence` layer choice measures block influence on
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"


class DemoPaths:
    """Where every artefact of one demo run lives (``out``) and the cross-run cache (``cache``)."""

    def __init__(self, out: Path, cache: Path):
        self.out = out
        self.cache = cache
        self.data = out / "data"
        self.logs = out / "logs"
        self.student_init = out / "student-init"
        self.train_prompts = self.data / "train_prompts.jsonl"
        self.heldout_prompts = self.data / "heldout_prompts.jsonl"
        self.all_prompts = self.data / "all_prompts.jsonl"       # train + dev, then held-out: one generate call
        self.teacher_all = self.data / "teacher_all.jsonl"
        self.teacher_train = self.data / "teacher_train.jsonl"
        self.teacher_dev = self.data / "teacher_dev.jsonl"
        self.teacher_heldout = self.data / "teacher_heldout.jsonl"
        self.sft = out / "sft"
        self.minillm = out / "minillm"
        self.eval = out / "eval"
        self.greedy = out / "greedy" / "answers.json"  # outside eval/, which a rerun of eval wipes


def resolve_device(device: str) -> tuple[str, str]:
    """(device, dtype) actually used: CUDA with bf16 when available under ``auto``, else CPU with fp32."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    dtype = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return device, dtype


class Demo:
    def __init__(self, profile: Profile, out: Path, cache: Path, device: str = "auto", force: bool = False):
        self.profile = profile
        self.paths = DemoPaths(out, cache)
        self.device, self.dtype = resolve_device(device)
        self.stages = Stages(out, STAGE_COUNT, force=force)
        self.teacher_dir: Path | None = None

    # ------------------------------------------------------------------------------------------ stages
    def run(self) -> dict[str, Any]:
        p, paths = self.profile, self.paths
        paths.out.mkdir(parents=True, exist_ok=True)
        print(f"[demo] profile {p.name}: {p.num_train} training + {p.num_dev} dev + {p.num_heldout} held-out "
              f"prompts, {p.max_new_tokens} new tokens, device {self.device} ({self.dtype}); output in {paths.out}")
        start = time.perf_counter()
        self.stage_teacher()
        self.stage_prompts()
        self.stage_teacher_data()
        self.stage_student_init()  # after the teacher's answers: the `influence` layer choice measures on them
        self.stage_sft()
        self.stage_minillm()
        self.stage_eval()
        self.stage_greedy()
        from .report import write_report

        report_start = time.perf_counter()
        summary = write_report(self, total_seconds=time.perf_counter() - start)
        print(f"[demo] ({STAGE_COUNT}/{STAGE_COUNT}) report: done in {time.perf_counter() - report_start:.1f} s")
        return summary

    def stage_teacher(self) -> None:
        p = self.profile
        if p.teacher != "smollm2":
            self.teacher_dir = Path(p.teacher)
            settings = {"path": str(self.teacher_dir.resolve()), "weights": _weights_digest(self.teacher_dir)}
            self.stages.run("teacher", f"use the teacher in {self.teacher_dir}", settings,
                            [self.teacher_dir / "config.json"], lambda: None)
            return
        from .models import convert_gguf_teacher, find_smollm2_gguf

        gguf = find_smollm2_gguf()
        self.teacher_dir = self.paths.cache / SMOLLM2_DIR_NAME
        settings = {"gguf": str(gguf), "bytes": gguf.stat().st_size}
        # The record sits in the cache next to the converted folder, so every profile and output dir shares it.
        self.stages.run("teacher", f"convert SmolLM2-135M-Instruct ({gguf.name}) into an HF folder (once)",
                        settings, [self.teacher_dir / "config.json", self.teacher_dir / "model.safetensors"],
                        lambda: convert_gguf_teacher(gguf, self.teacher_dir),
                        record=self.paths.cache / f"{SMOLLM2_DIR_NAME}.stage.json")

    def stage_student_init(self) -> None:
        from .models import prune_layers

        p = self.profile
        settings = {"teacher": self.stages.fp("teacher"), "keep_layers": p.keep_layers, "choice": p.layer_choice}
        if p.layer_choice == "influence":
            settings.update(data=self.stages.fp("teacher-data"), calibration=CALIBRATION_ANSWERS)

        def build() -> None:
            calibration = self._calibration() if p.layer_choice == "influence" else None
            kept = prune_layers(self.teacher_dir, self.paths.student_init, p.keep_layers, p.layer_choice,
                                calibration)
            print(f"    | kept teacher layers {kept}")

        self.stages.run("student-init", f"student = the teacher with {p.keep_layers} of its layers kept "
                        f"({p.layer_choice})",
                        settings, [self.paths.student_init / "config.json"], build)

    def _calibration(self) -> list[list[int]]:
        """Token ids of the first CALIBRATION_ANSWERS training prompts with the teacher's answers and EOS."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.teacher_dir)
        rows = [json.loads(line) for line in self.paths.teacher_train.read_text().splitlines() if line.strip()]
        return [tokenizer(r["prompt"] + r["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                for r in rows[:CALIBRATION_ANSWERS]]

    def stage_prompts(self) -> None:
        from . import prompts as P

        p, paths = self.profile, self.paths
        if p.prompts == "smollm2":
            sources = {"ifbench": P.ifbench_file(), "own": P.OWN_PROMPTS}
        elif p.prompts == "tiny":
            sources = {"train": Path("tests/assets/data/train.jsonl"), "dev": Path("tests/assets/data/dev.jsonl")}
        else:
            raise ValueError(f"unknown prompt source `{p.prompts}` in profile {p.name}")
        settings = {"teacher": self.stages.fp("teacher"), "sources": {k: file_digest(v) for k, v in sources.items()},
                    "template": p.template, "max_prompt_length": p.max_prompt_length, "num_train": p.num_train,
                    "num_dev": p.num_dev, "num_heldout": p.num_heldout, "seed": p.data_seed}

        def build() -> None:
            from transformers import AutoTokenizer

            from ..data import Record, render_prompt

            tokenizer = AutoTokenizer.from_pretrained(self.teacher_dir)
            if p.prompts == "smollm2":
                loaded = {"ifbench": P.load_ifbench_prompts(sources["ifbench"]), "own": P.load_own_prompts()}
            else:
                loaded = {k: P.load_instruction_records(v) for k, v in sources.items()}

            def fits(prompt: P.Prompt) -> bool:
                text = render_prompt(Record(instruction=prompt.instruction, input=prompt.input), tokenizer,
                                     p.template)
                return len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= p.max_prompt_length

            kept = {k: [x for x in v if fits(x)] for k, v in loaded.items()}
            for k in loaded:
                print(f"    | {k}: {len(kept[k])} of {len(loaded[k])} prompts fit in {p.max_prompt_length} tokens")
            train, heldout = P.split_prompts(list(kept.values()), p.num_train + p.num_dev, p.num_heldout,
                                             seed=p.data_seed)
            P.write_prompt_file(train, paths.train_prompts)
            P.write_prompt_file(heldout, paths.heldout_prompts)
            P.write_prompt_file(train + heldout, paths.all_prompts)
            print(f"    | {len(train)} train/dev prompts, {len(heldout)} held-out prompts")

        self.stages.run("prompts", "pick and split the prompts (IFBench + our own)" if p.prompts == "smollm2"
                        else "pick and split the prompts (tests/assets/data)", settings,
                        [paths.train_prompts, paths.heldout_prompts, paths.all_prompts], build)

    def stage_teacher_data(self) -> None:
        p, paths = self.profile, self.paths
        settings = {"teacher": self.stages.fp("teacher"), "prompts": self.stages.fp("prompts"),
                    "max_new_tokens": p.max_new_tokens, "dtype": self.dtype, "seed": p.data_seed}
        if p.sft_temperature != 1.0:  # only then, so that runs at the default keep their cached answers
            settings["sft_temperature"] = p.sft_temperature

        def build() -> None:
            if p.sft_temperature == 1.0:  # one call: train, dev and held-out answers all at T = 1
                rows = self._generate(paths.all_prompts, paths.teacher_all, 1.0, settings, "generate.log")
                num_train_side = sum(1 for line in paths.train_prompts.read_text().splitlines() if line.strip())
                train_side, heldout = rows[:num_train_side], rows[num_train_side:]
            else:  # training answers at the lower temperature; the held-out references stay T = 1 (scored)
                train_side = self._generate(paths.train_prompts, paths.data / "teacher_train_side.jsonl",
                                            p.sft_temperature, settings, "generate-train.log")
                heldout = self._generate(paths.heldout_prompts, paths.data / "teacher_heldout_t1.jsonl", 1.0,
                                         settings, "generate.log")
            if len(heldout) != p.num_heldout:
                raise RuntimeError(f"{paths.data}: expected {p.num_heldout} held-out answers, got {len(heldout)} "
                                   "(were prompts dropped as too long?)")
            _write_jsonl(paths.teacher_train, train_side[:len(train_side) - p.num_dev])
            _write_jsonl(paths.teacher_dev, train_side[len(train_side) - p.num_dev:])
            _write_jsonl(paths.teacher_heldout, heldout)

        t = "" if p.sft_temperature == 1.0 else f" (training answers at T = {p.sft_temperature:g})"
        self.stages.run("teacher-data", "the teacher answers every prompt (minillm-generate): training data and "
                        f"held-out references{t}", settings,
                        [paths.teacher_train, paths.teacher_dev, paths.teacher_heldout], build)

    def _generate(self, prompts: Path, out: Path, temperature: float, settings: dict[str, Any],
                  log_name: str) -> list[dict[str, Any]]:
        """The teacher's answers to every prompt of ``prompts`` (minillm-generate), in prompt order."""
        p = self.profile
        # Same settings as an interrupted earlier attempt: minillm-generate resumes it; else (or --force) it
        # starts over.
        marker = out.with_name(out.stem + ".settings.json")
        call = {**settings, "temperature": temperature} if temperature != 1.0 else settings
        same = not self.stages.force and marker.exists() and json.loads(marker.read_text()) == call
        marker.write_text(json.dumps(call) + "\n")
        run_command(python_module(
            "minillm.cli.generate", "--model", self.teacher_dir, "--data", prompts, "--out", out,
            "--template", p.template, "--max-prompt-length", p.max_prompt_length,
            "--max-new-tokens", p.max_new_tokens, "--temperature", temperature, "--batch-size", p.batch_size,
            "--seed", p.data_seed, "--device", self.device, "--dtype", self.dtype,
            *([] if same else ["--overwrite"])), self.paths.logs / log_name, echo=ProgressFilter())
        rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        expected = sum(1 for line in prompts.read_text().splitlines() if line.strip())
        if len(rows) != expected:
            raise RuntimeError(f"{out}: expected {expected} responses, got {len(rows)} (were prompts dropped as "
                               "too long?)")
        return sorted(rows, key=lambda r: r["index"])

    def _train_config(self, method: str, student: Path, output_dir: Path, overrides: dict[str, Any]) -> dict:
        p = self.profile
        cfg: dict[str, Any] = {
            "method": method, "output_dir": str(output_dir), "seed": 10,
            "student": {"path": str(student), "dtype": self.dtype},
            "data": {"train": str(self.paths.teacher_train), "dev": str(self.paths.teacher_dev), "template": "auto",
                     "max_prompt_length": p.max_prompt_length,
                     "max_length": p.max_prompt_length + p.max_new_tokens + 1},
            "train": {"save_interval": 0, "keep_checkpoints": 1},
            "strategy": {"backend": "local", "device": self.device},
            "eval": {"batch_size": p.batch_size, "max_new_tokens": p.max_new_tokens, "num_prompts": -1},
            "logging": {"log_interval": 1, "progress_bar": False},
        }
        if method == "minillm":
            cfg["teacher"] = {"path": str(self.teacher_dir), "dtype": self.dtype}
            cfg["rollout"] = {"max_new_tokens": p.max_new_tokens, "teacher_mix_alpha": 0.2}
            # No pre-training corpus ships with the demo, so the PT loss (phase 2 of the paper) is off.
            cfg["minillm"] = {"ptx_coef": 0.0}
            cfg["optim"] = {"scheduler": "constant", "warmup_steps": 0, "betas": [0.9, 0.95], "weight_decay": 1e-6}
            cfg["train"].update({"select_best_by": "rougeL", "eval_at_start": True})
        else:
            cfg["optim"] = {"scheduler": "cosine", "weight_decay": 0.01}
            cfg["train"].update({"select_best_by": "loss", "eval_at_start": True})
            cfg["eval"]["rouge"] = False  # dev loss only: generating would cost more than the SFT steps
        for section, values in overrides.items():
            cfg.setdefault(section, {}).update(values)
        steps = cfg["train"]["max_steps"]
        cfg["train"].setdefault("eval_interval", max(1, steps // 2))
        return cfg

    def _train(self, name: str, title: str, cfg: dict[str, Any], inputs: dict[str, str]) -> None:
        out = Path(cfg["output_dir"])
        config_file = self.paths.out / f"{name}.yaml"

        def build() -> None:
            shutil.rmtree(out, ignore_errors=True)  # a fresh run: the settings changed or the last one was cut off
            config_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
            run_command(python_module("minillm.cli.train", "--config", config_file), self.paths.logs / f"{name}.log",
                        echo=_train_line)

        self.stages.run(name, title, {"config": cfg, **inputs}, [out / "final" / "config.json",
                                                                 out / "metrics.jsonl"], build)

    def stage_sft(self) -> None:
        cfg = self._train_config("sft", self.paths.student_init, self.paths.sft, self.profile.sft)
        self._train("sft", f"warm start: SFT of the student on the teacher's responses "
                    f"({cfg['train']['max_steps']} steps)", cfg,
                    {"student": self.stages.fp("student-init"), "data": self.stages.fp("teacher-data")})

    def stage_minillm(self) -> None:
        cfg = self._train_config("minillm", self.paths.sft / "final", self.paths.minillm, self.profile.minillm)
        self._train("minillm", f"MiniLLM: reverse-KL policy gradient from the SFT student "
                    f"({cfg['train']['max_steps']} steps)", cfg,
                    {"sft": self.stages.fp("sft"), "teacher": self.stages.fp("teacher"),
                     "data": self.stages.fp("teacher-data")})

    def eval_models(self) -> dict[str, Path]:
        return {"teacher": self.teacher_dir, "sft": self.paths.sft / "final", "minillm": self.paths.minillm / "final"}

    def stage_eval(self) -> None:
        p, paths = self.profile, self.paths
        models = self.eval_models()
        settings = {"teacher": self.stages.fp("teacher"), "sft": self.stages.fp("sft"),
                    "minillm": self.stages.fp("minillm"), "data": self.stages.fp("teacher-data"),
                    "seeds": list(p.eval_seeds), "max_new_tokens": p.max_new_tokens, "dtype": self.dtype}

        def build() -> None:
            shutil.rmtree(paths.eval, ignore_errors=True)
            run_command(python_module(
                "minillm.cli.eval", "--model", *models.values(), "--name", *models.keys(),
                "--data", paths.teacher_heldout, "--out", paths.eval, "--seeds", *p.eval_seeds,
                "--max-new-tokens", p.max_new_tokens, "--max-prompt-length", p.max_prompt_length,
                "--batch-size", p.batch_size, "--teacher", self.teacher_dir, "--dist",
                "--device", self.device, "--dtype", self.dtype), paths.logs / "eval.log", echo=ProgressFilter())

        self.stages.run("eval", "minillm-eval of teacher, SFT and MiniLLM students on the held-out prompts "
                        "(Rouge-L vs the teacher's answers, teacher log-likelihood, Dist-4)", settings,
                        [paths.eval / "results.json"], build)

    def stage_greedy(self) -> None:
        """Greedy answers of all three models to the held-out prompts (read by people; the scores stay T = 1).

        Its own stage, so that changing a greedy setting reruns only this one, never training or evaluation."""
        from .greedy import write_greedy

        p, paths = self.profile, self.paths
        models = self.eval_models()
        tokens = p.greedy_max_new_tokens if p.greedy_max_new_tokens > 0 else p.max_new_tokens
        settings = {"teacher": self.stages.fp("teacher"), "sft": self.stages.fp("sft"),
                    "minillm": self.stages.fp("minillm"), "data": self.stages.fp("teacher-data"),
                    "max_new_tokens": tokens, "max_prompt_length": p.max_prompt_length, "dtype": self.dtype,
                    "repetition_penalty": p.greedy_repetition_penalty}
        penalty = "" if p.greedy_repetition_penalty == 1.0 else f", repetition penalty {p.greedy_repetition_penalty:g}"
        self.stages.run("greedy", f"greedy answers of teacher, SFT and MiniLLM students to the held-out prompts "
                        f"(up to {tokens} tokens{penalty})", settings, [paths.greedy],
                        lambda: write_greedy(models, paths.teacher_heldout, paths.greedy, max_new_tokens=tokens,
                                             max_prompt_length=p.max_prompt_length, batch_size=p.batch_size,
                                             device=self.device, dtype=self.dtype,
                                             repetition_penalty=p.greedy_repetition_penalty))


def _train_line(line: str) -> bool:
    """Which training log lines the demo shows: step metrics, evaluations and the end; not library chatter."""
    keep = ("step ", "done", "data:", "rollout", "saved", "best", "Error", "error", "Traceback")
    return any(k in line for k in keep) and "Warning" not in line


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _weights_digest(model_dir: Path) -> str:
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    return ",".join(file_digest(f) for f in files)
