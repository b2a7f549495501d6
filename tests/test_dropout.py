"""No dropout during RL (issue 15 item 7): with gradient checkpointing the MiniLLM student stays in train mode, so
every dropout-like rate must be 0, whatever the family calls it. Oracle: in train mode after disable_dropout, a
forward is deterministic and equals the eval-mode forward."""

from __future__ import annotations

import pytest
import torch

from minillm.trainers.minillm import disable_dropout


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                    num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16,
                                    dropout=0.5, attention_dropout=0.5, activation_dropout=0.5, layerdrop=0.2))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                      resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=32, max_position_embeddings=32,
                                        attention_dropout=0.5))


@pytest.mark.parametrize("build, expected", [
    (_opt, {"activation_dropout", "layerdrop", "attention_dropout", "dropout"}),
    (_gpt2, {"resid_pdrop", "embd_pdrop", "attn_pdrop"}),
    (_llama, {"attention_dropout"}),
])
def test_train_mode_without_dropout_equals_eval(build, expected):
    torch.manual_seed(0)
    model = build()
    ids = torch.randint(0, 64, (3, 12))
    model.train()
    with torch.no_grad():
        outs = [model(input_ids=ids).logits for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # the rates are live: train-mode forwards differ
    changed = disable_dropout(model)
    assert expected <= {c.rsplit(".", 1)[-1] for c in changed}, changed
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
        model.eval()
        reference = model(input_ids=ids).logits
    assert torch.equal(a, b) and torch.equal(a, reference)


def test_minillm_student_with_gradient_checkpointing_has_no_dropout(tmp_path):
    """The trainer's own path: gradient checkpointing keeps train mode, with every rate zeroed."""
    from minillm.cli.train import build_trainer
    from minillm.config import load_config
    from minillm.strategy import build_strategy

    cfg = load_config("configs/tiny/minillm.yaml", [f"output_dir={tmp_path}", "student.gradient_checkpointing=true"])
    trainer = build_trainer(cfg, build_strategy(cfg).setup())
    student = trainer.strategy.unwrap(trainer.student)
    assert student.training
    assert disable_dropout(student) == []  # nothing left to switch off
