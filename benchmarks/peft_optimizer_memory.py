"""Optimizer-state memory of a full student and of a LoRA student (``student.peft``), written to
``benchmarks/results/peft-optimizer-memory.json``.

    python benchmarks/peft_optimizer_memory.py

* ``tiny``: the committed test student (tests/assets/student), measured: one real AdamW step through
  ``minillm.optim.build_optimizer``, then the elements and bytes of every state tensor are counted.
* ``llama-7b``: LLaMA-7B's architecture built on the meta device (no weights, no memory) with the recipe's adapter
  (configs/minillm/llama-7b-lora.yaml: r=8 on q_proj, v_proj) and with r=16 on every attention and MLP
  projection; the trainable parameters are
  counted and AdamW's state (two fp32 moments per trainable parameter) computed from them, beside the other
  per-parameter bytes of mixed-precision training (DeepSpeed bf16/fp16: fp32 master weights + half-precision
  gradients).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def optimizer_state(model: torch.nn.Module) -> dict:
    """One AdamW step on a made-up loss; the state's element count and bytes, and the trainable parameters."""
    from minillm.config import OptimConfig
    from minillm.optim import build_optimizer

    optimizer = build_optimizer(model, OptimConfig(lr=1e-3))
    ids = torch.arange(8)[None]
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    tensors = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    moments = [t for state in optimizer.state.values() for k, t in state.items() if k in ("exp_avg", "exp_avg_sq")]
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "optimizer_state_elements": sum(t.numel() for t in tensors),
            "optimizer_moment_elements": sum(t.numel() for t in moments),
            "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in tensors)}


def tiny(r: int = 4) -> dict:
    from minillm.adapter_config import PeftConfig
    from minillm.config import ModelConfig
    from minillm.models import load_model

    path = str(REPO / "tests" / "assets" / "student")
    out = {"full": optimizer_state(load_model(ModelConfig(path=path), trainable=True))}
    lora = PeftConfig(method="lora", r=r, alpha=2.0 * r, target_modules=ALL_PROJECTIONS)
    out[f"lora_r{r}_all_projections"] = optimizer_state(load_model(ModelConfig(path=path, peft=lora), trainable=True))
    return out


def llama_7b() -> dict:
    """Counted on the meta device; bytes per trainable parameter: fp32 master 4 + Adam moments 8 + bf16 grad 2, and
    2 bytes (bf16) for every weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minillm.adapter_config import PeftConfig
    from minillm.adapters import add_adapter

    def build():
        with torch.device("meta"):
            return LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                                num_hidden_layers=32, num_attention_heads=32))

    adapters = {"lora_r8_q_v (configs/minillm/llama-7b-lora.yaml)": (8, ["q_proj", "v_proj"]),
                "lora_r16_all_projections": (16, ALL_PROJECTIONS)}
    out = {}
    models = [("full", build())] + [(name, add_adapter(build(), PeftConfig(
        method="lora", r=r, alpha=2.0 * r, target_modules=targets), "llama-7b", seed=0))
        for name, (r, targets) in adapters.items()]
    for name, model in models:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        out[name] = {"parameters": total, "trainable_parameters": trainable,
                     "optimizer_state_bytes": 8 * trainable,  # AdamW exp_avg + exp_avg_sq in fp32
                     "master_weights_bytes": 4 * trainable, "gradient_bytes": 2 * trainable,
                     "weights_bytes_bf16": 2 * total,
                     "total_training_state_bytes": 2 * total + 14 * trainable}
    return out


def main() -> dict:
    result = {"what": "optimizer state of a full vs a LoRA student (AdamW: two fp32 moments per trainable parameter)",
              "versions": {"torch": torch.__version__, "peft": __import__("peft").__version__},
              "tiny_measured": tiny(), "llama_7b_counted": llama_7b()}
    path = REPO / "benchmarks" / "results" / "peft-optimizer-memory.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
