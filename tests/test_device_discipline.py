"""Device discipline: the class of bug that only shows on a GPU, caught on a CPU.

On CUDA a tensor made without ``device=`` lands on the CPU, and the first ``torch.stack``/``cat``/collective that
meets it next to a CUDA tensor fails (the first H200 run crashed this way in every MiniLLM phase). The CPU suite
cannot see that by running code on the CPU, where every tensor is on the same device. Two checks can:

* a lint over ``minillm/``: every tensor factory and ``torch.Generator`` names its device, except in the host-side
  places listed in :data:`HOST_SIDE`, each with the reason it is host-side;
* the trainers' pure tensor code run with its inputs on the ``meta`` device, which refuses to mix devices exactly as
  CUDA does (``torch.stack([meta, cpu])`` raises).
"""

from __future__ import annotations

import ast
import math
import sys
from pathlib import Path

import pytest
import torch

from minillm import losses
from minillm.generation.rollout import Rollout

PACKAGE = Path(__file__).resolve().parent.parent / "minillm"

# torch.<name>(...) calls that create a tensor (or a generator) on the default device unless told otherwise.
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "linspace", "eye", "rand", "randn",
             "randint", "randperm", "Generator"}

# "module path::qualified function" → why the tensors it makes belong on the host. Entries that no longer match a
# call fail the test too, so the list cannot go stale.
HOST_SIDE = {
    # data loading: collators and datasets build CPU batches; the trainers move each batch with to_device()
    "data/collate.py::SFTCollator.__call__": "collates a CPU batch in a DataLoader",
    "data/collate.py::PromptCollator.__call__": "collates a CPU batch in a DataLoader",
    "data/instruction.py::sft_item": "dataset item, CPU",
    "data/instruction.py::PromptDataset.__getitem__": "dataset item, CPU",
    "data/kd_cache.py::ResponseTopKCache.topk": "reads the memory-mapped cache on the host; TopKLogprobs moves the "
                                                "rows chunk by chunk to the loss's device",
    "data/sampler.py::ResumableSampler.epoch_indices": "index permutation for a DataLoader sampler, host-side",
    # argument validation: a 1x1 dummy through the warpers before any forward, never mixed with model outputs
    "generation/engine.py::check_engine_inputs": "validates warper settings on a 1x1 CPU dummy",
    "generation/sampling.py::mixed_sample": "validates warper settings on a 1x1 CPU dummy",
    "generation/sampling.py::teacher_forced_logprobs": "validates warper settings on a 1x1 CPU dummy",
    # analyses run after generation on CPU copies of the outputs
    "evaluation/analysis.py::_as_1d": "post-hoc analysis on CPU lists",
    "evaluation/analysis.py::right_pad": "post-hoc analysis on CPU lists",
    "evaluation/analysis.py::choice_confidences": "post-hoc analysis, CPU result table",
    "evaluation/analysis.py::_label_indices": "post-hoc analysis on CPU lists",
    "evaluation/analysis.py::_position_means": "post-hoc analysis, CPU result table",
    "evaluation/analysis.py::exposure_bias_curve": "post-hoc analysis, CPU result table",
    "evaluation/analysis.py::response_forward_kl": "post-hoc analysis, CPU accumulator of .cpu() values",
    "evaluation/extras.py::_table": "CPU result table",
    # random streams that must not depend on the device (the same permutation on CPU and GPU, on every rank)
    "trainers/ranking.py::pair_permutation": "permutes rows with the caller's CPU generator (device-independent)",
    "trainers/student_data.py::ReplayBuffer.sample": "draws with the caller's CPU generator (same on every rank)",
    "trainers/student_data.py::StudentData._coin_generator": "CPU coin stream, identical on every rank and device",
    "trainers/student_data.py::StudentData.choose": "CPU coin stream, identical on every rank and device",
    # benchmarks draw their synthetic inputs on the CPU with a seeded CPU generator, then move them
    "bench/parts.py::run_benchmark": "seeded synthetic prompts, moved to the device after",
    "bench/kl.py::_inputs": "seeded synthetic inputs, moved to the device after",
    "bench/kl.py::_inputs.randn": "seeded synthetic inputs, moved to the device after",
    "bench/phase.py::RandomTokenCorpus.__init__": "seeded synthetic corpus, a CPU dataset",
    "bench/phase.py::random_prompts": "seeded synthetic prompts, moved to the device after",
}


def _factories_without_device() -> dict[str, list[int]]:
    """``{"path::qualname": [line, ...]}`` for every torch.<factory>(...) call in minillm/ without ``device=``."""
    found: dict[str, list[int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        scope: list[str] = []

        def visit(node: ast.AST) -> None:
            named = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if named:
                scope.append(node.name)
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and not any(k.arg == "device" for k in node.keywords)):
                found.setdefault(f"{rel}::{'.'.join(scope)}", []).append(node.lineno)
            for child in ast.iter_child_nodes(node):
                visit(child)
            if named:
                scope.pop()

        visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def test_tensor_factories_name_their_device():
    found = _factories_without_device()
    unlisted = {k: v for k, v in found.items() if k not in HOST_SIDE}
    assert not unlisted, (
        "tensor factories without device= in code that may run on the training device (pass device=..., or, if the "
        "tensor really belongs on the host, add the function to HOST_SIDE with the reason):\n"
        + "\n".join(f"  minillm/{k.split('::')[0]}:{lines} in {k.split('::')[1]}" for k, lines in unlisted.items()))
    stale = sorted(set(HOST_SIDE) - set(found))
    assert not stale, f"HOST_SIDE entries that no longer make a device-less tensor (remove them): {stale}"


def test_the_lint_sees_a_planted_factory(tmp_path, monkeypatch):
    """The lint is only as good as its parser: a device-less factory in a nested function is found, a factory with
    device= and a method call that merely shares a name (x.new_zeros, np.zeros) are not."""
    pkg = tmp_path / "minillm"
    pkg.mkdir()
    (pkg / "planted.py").write_text(
        "import torch\nimport numpy as np\n"
        "class Trainer:\n"
        "    def stats(self, x):\n"
        "        def inner():\n"
        "            return torch.tensor(3.0)\n"
        "        ok = torch.zeros(2, device=x.device)\n"
        "        return torch.stack([x.sum(), inner()]), x.new_zeros(2), np.zeros(3), ok\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    assert _factories_without_device() == {"planted.py::Trainer.stats.inner": [6]}


# ------------------------------------------------------------------------------------------ meta-device runs
META = torch.device("meta")


def _meta_rollout(rows: int = 3, length: int = 5, prompt: int = 4) -> Rollout:
    def f(*shape):
        return torch.empty(*shape, device=META)

    return Rollout(prompt_ids=torch.empty(rows, prompt, dtype=torch.long, device=META),
                   prompt_mask=torch.empty(rows, prompt, dtype=torch.long, device=META),
                   response_ids=torch.empty(rows, length, dtype=torch.long, device=META),
                   response_mask=f(rows, length), old_logprobs=f(rows, length), teacher_logprobs=f(rows, length),
                   weights=f(rows, length), rewards=f(rows, length), returns=f(rows, length),
                   prompt_index=torch.empty(rows, dtype=torch.long, device=META))


def test_phase_statistics_stay_on_the_buffers_device():
    """The first H200 run crashed in every MiniLLM phase: the phase totals stacked CUDA sums with CPU scalars."""
    from minillm.trainers.minillm import rollout_totals

    totals = rollout_totals(_meta_rollout(), tokens=42.0)
    assert totals.device == META and totals.shape == (8,) and totals.dtype == torch.float64


def test_phase_statistics_values():
    """rollout_totals + rollout_statistics against sums written out by hand (float64)."""
    from minillm.trainers.minillm import rollout_statistics, rollout_totals

    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    old = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    teacher = torch.tensor([[-1.5, -1.0, 0.0], [-2.5, 0.0, 0.0]])
    weights = torch.tensor([[0.5, 2.0, 1.0], [1.5, 1.0, 1.0]])
    rewards = torch.tensor([[0.25, -0.5, 0.0], [1.0, 0.0, 0.0]])
    buf = Rollout(prompt_ids=torch.zeros(2, 2, dtype=torch.long), prompt_mask=torch.ones(2, 2, dtype=torch.long),
                  response_ids=torch.zeros(2, 3, dtype=torch.long), response_mask=mask, old_logprobs=old,
                  teacher_logprobs=teacher, weights=weights, rewards=rewards, returns=rewards,
                  prompt_index=torch.arange(2))
    # two ranks holding the same buffer: an all-reduce doubles every sum and count, the means stay
    stats = rollout_statistics(rollout_totals(buf, tokens=7.0) * 2)
    # k3 per row = mean over its tokens of exp(d_t) − 1 − d_t, d_t = log p − log q (length-normalised)
    d = [[-0.5, 1.0], [-2.0]]
    k3_rows = [sum(math.exp(x) - 1 - x for x in row) / len(row) for row in d]
    assert stats["rollout/reward"] == pytest.approx((0.25 - 0.5 + 1.0) / 3)
    assert stats["rollout/teacher_logprob"] == pytest.approx((-1.5 - 1.0 - 2.5) / 3)
    assert stats["rollout/student_logprob"] == pytest.approx((-1.0 - 2.0 - 0.5) / 3)
    assert stats["rollout/weight"] == pytest.approx((0.5 + 2.0 + 1.5) / 3)
    assert stats["rollout/reverse_kl_k3"] == pytest.approx(sum(k3_rows) / 2, rel=1e-6)
    assert stats["rollout/response_length"] == pytest.approx(1.5)
    assert stats["rollout/tokens"] == pytest.approx(14.0)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device=META)


@pytest.mark.parametrize("name, call", [
    ("token_logprobs", lambda: losses.token_logprobs(_meta(2, 5, 11), _meta(2, 5, dtype=torch.long))),
    ("importance_weights", lambda: losses.importance_weights(_meta(2, 5), _meta(2, 5), _meta(2, 5), 0.2)),
    ("token_rewards", lambda: losses.token_rewards(_meta(2, 5), _meta(2, 5), _meta(2, 5))),
    ("long_range_advantages", lambda: losses.long_range_advantages(_meta(2, 5), _meta(2, 5))),
    ("long_range_advantages γ=1 no norm", lambda: losses.long_range_advantages(_meta(2, 5), _meta(2, 5), gamma=1.0,
                                                                                length_norm=False)),
    ("whiten masked", lambda: losses.whiten(_meta(2, 5), _meta(2, 5))),
    ("whiten all-reduced", lambda: losses.whiten(_meta(2, 5), _meta(2, 5), all_reduce=lambda t: t)),
    ("k3_reverse_kl", lambda: losses.k3_reverse_kl(_meta(2, 5), _meta(2, 5), _meta(2, 5))),
    ("ppo_clip_loss", lambda: losses.ppo_clip_loss(_meta(2, 5), _meta(2, 5), _meta(2, 5), _meta(2, 5))),
    ("single_step_kl", lambda: losses.single_step_kl(_meta(2, 5, 11), _meta(2, 5, 11), _meta(2, 5))),
    ("pt_loss", lambda: losses.pt_loss(_meta(2, 5, 11), _meta(2, 5, dtype=torch.long), _meta(2, 5, 11))),
    ("divergence jsd", lambda: losses.divergence(_meta(2, 5, 11), _meta(2, 5, 11), _meta(2, 5), "jsd")),
    ("sequence_logprobs", lambda: losses.sequence_logprobs(_meta(2, 5), _meta(2, 5), length_norm=True)),
])
def test_losses_never_leave_their_inputs_device(name, call):
    """Every pure loss runs on meta inputs without touching another device, and answers on meta."""
    out = call()
    outs = out if isinstance(out, tuple) else (out,)
    for value in outs:
        for t in (value.values() if isinstance(value, dict) else [value]):
            if isinstance(t, torch.Tensor):
                assert t.device == META, f"{name} returned a tensor on {t.device}"
