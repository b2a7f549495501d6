"""``models.teacher_precision_advice`` for a teacher whose half precision is not the student's.

The paper recipes ship ``teacher.dtype: fp16`` beside an fp16 DeepSpeed student; the documented one-GPU setup
overrides ``strategy.backend=local student.dtype=bf16``, which leaves the teacher in fp16 inside the student's
bf16 autocast. ``minillm-train`` logs this advice as a warning before loading the teacher.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minillm.config import load_config
from minillm.models import teacher_precision_advice

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "eval")  # eval configs: no teacher


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("backend", ["local", "deepspeed", None])
def test_an_fp16_teacher_beside_a_bf16_student_is_told_to_set_teacher_dtype_bf16(device, backend):
    advice = teacher_precision_advice("bf16", "fp16", device, backend)
    assert advice is not None
    assert "teacher.dtype is fp16" in advice and "Set teacher.dtype=bf16" in advice
    assert ("autocast" in advice) == (backend != "deepspeed")  # the local backend's reason
    assert ("65504" in advice) == (backend != "local")  # DeepSpeed's: fp16 range
    assert teacher_precision_advice("bf16", "fp16", device) == teacher_precision_advice("bf16", "fp16", device, None)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_a_bf16_teacher_beside_an_fp16_student_is_told_to_set_teacher_dtype_fp16(device):
    advice = teacher_precision_advice("fp16", "bf16", device, "deepspeed")
    assert advice is not None and "teacher.dtype is bf16" in advice and "Set teacher.dtype=fp16" in advice


def test_no_advice_when_the_teacher_suits_the_run():
    for student, teacher in (("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"), ("fp32", "fp16"),
                             ("fp32", "bf16"), ("bf16", "fp32"), ("fp16", "fp32")):
        for backend in ("local", "deepspeed"):
            if teacher == "fp32" and student != "fp32":
                continue  # the fp32-teacher advice, CUDA only (tests/test_infrastructure.py)
            assert teacher_precision_advice(student, teacher, "cuda", backend) is None, (student, teacher)
    assert teacher_precision_advice("bf16", "fp32", "cpu", "local") is None


def test_the_one_gpu_override_of_every_shipped_fp16_recipe_is_warned_and_no_recipe_mixes_precisions():
    fp16_teachers = 0
    for path in SHIPPED:
        cfg = load_config(str(path), world_size=1)
        if cfg.method == "sft":
            continue  # no teacher
        # as shipped, student and teacher precisions agree (or the teacher is fp32 on CPU-sized tiny runs)
        assert teacher_precision_advice(cfg.student.dtype, cfg.teacher.dtype, "cuda",
                                        cfg.strategy.backend) is None, path
        if cfg.teacher.dtype != "fp16":
            continue
        fp16_teachers += 1
        local = load_config(str(path), ["strategy.backend=local", "student.dtype=bf16"], world_size=1)
        advice = teacher_precision_advice(local.student.dtype, local.teacher.dtype, "cuda", local.strategy.backend)
        assert advice is not None and "teacher.dtype=bf16" in advice and "autocast" in advice, path
        fixed = load_config(str(path), ["strategy.backend=local", "student.dtype=bf16", "teacher.dtype=bf16"],
                            world_size=1)
        assert teacher_precision_advice(fixed.student.dtype, fixed.teacher.dtype, "cuda",
                                        fixed.strategy.backend) is None, path
    assert fp16_teachers >= 20  # the gpt2/opt/llama recipes of kd, seqkd, gkd, distillm and minillm


def test_bf16_autocast_recasts_an_fp16_teachers_weights():
    """What the local-backend advice says: the student's bf16 autocast runs an fp16 teacher's matmuls in bf16."""
    layer = torch.nn.Linear(8, 4, dtype=torch.float16).requires_grad_(False)
    x = torch.randn(2, 8, dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    assert layer(x).dtype == torch.float16
