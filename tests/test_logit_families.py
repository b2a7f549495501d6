"""The chunked losses on every model family users distil (issue 15 item 5).

The chunked path computes logits as head(last hidden state). Families that post-process their logits after the
head (Gemma-2's soft-capping, Granite's ``logits_scaling``, Cohere's ``logit_scale``) must get the same
post-processing inside the head; the others must simply agree. Each family is a tiny random model built here;
the oracle is the model's own ``model(...).logits`` fed to the plain loss. A model that post-processes in a way we
do not know is caught by the first-call probe, and the trainer falls back to the plain losses with one warning.
"""

from __future__ import annotations

import logging

import pytest
import torch

from minillm.losses import chunked as chunked_losses
from minillm import losses
from minillm.losses.heads import chunked_head_matches, hidden_and_head

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)
FAMILIES = {  # model_type → (config kwargs, scale of the head weights: logits at a realistic size where it matters)
    "gpt2": (dict(n_embd=32, n_layer=2, n_head=2, n_positions=64), 1.0),
    "opt": (dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2, max_position_embeddings=64,
                 word_embed_proj_dim=32), 1.0),
    "llama": (SMALL, 1.0),
    "qwen2": (SMALL, 1.0),  # run with a padded vocabulary below
    "qwen3": (dict(SMALL, head_dim=16), 1.0),
    "mistral": (SMALL, 1.0),
    "phi3": (SMALL, 1.0),
    "gpt_neox": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64), 1.0),
    "gemma3_text": (dict(SMALL, head_dim=16), 1.0),
    "olmo2": (SMALL, 1.0),
    # post-processing families: logits large enough that the cap / scale changes the distribution a lot
    "gemma2": (dict(SMALL, head_dim=16, final_logit_softcapping=30.0), 300.0),
    "granite": (dict(SMALL, logits_scaling=4.0), 20.0),
    "cohere": (dict(SMALL, logit_scale=0.25), 20.0),
}
POST_PROCESSING = {"gemma2", "granite", "cohere"}


def _model(kind: str, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs, head_scale = FAMILIES[kind]
    config = AutoConfig.for_model(kind, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_chunked_head_and_losses_equal_the_models_own_logits(kind):
    student, teacher = _model(kind, 1), _model(kind, 2)
    vocab = VOCAB - 6 if kind == "qwen2" else VOCAB  # Qwen2 ships padded embedding rows: losses see the first V
    trim = lambda x: x[..., :vocab]  # noqa: E731
    ids = torch.randint(1, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9)
    mask[1, 6:] = 0
    if kind in POST_PROCESSING:  # the post-processing matters at this scale: a bare head would be far off
        with torch.no_grad():
            bare = student.get_output_embeddings()(hidden_and_head(student, ids, trim=trim)[0])
            assert (torch.log_softmax(bare, -1) - torch.log_softmax(student(input_ids=ids).logits, -1)).abs().max() > 0.5
    # the head reproduces every position's logits, not just the last one the first-call check looks at
    hidden, head = hidden_and_head(student, ids, trim=trim)
    with torch.no_grad():
        torch.testing.assert_close(head(hidden), trim(student(input_ids=ids).logits), atol=1e-4, rtol=1e-4)
    # the plain loss on the model's own logits
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        t_logits = trim(teacher(input_ids=ids).logits)
    plain = losses.single_step_kl(trim(student(input_ids=ids).logits), t_logits, mask)
    plain.backward()
    reference = _grads(student)
    for fused in (True, False):
        student.zero_grad(set_to_none=True)
        hidden, head = hidden_and_head(student, ids, trim=trim)
        with torch.no_grad():
            t_hidden, t_head = hidden_and_head(teacher, ids, trim=trim)
        chunked = chunked_losses.chunked_single_step_kl(hidden, head, mask, teacher_hidden=t_hidden,
                                                        teacher_head=t_head, chunk_size=4, fused=fused)
        chunked.backward()
        assert chunked.item() == pytest.approx(plain.item(), rel=1e-5, abs=1e-7), (kind, fused)
        got = _grads(student)
        assert got.keys() == reference.keys()
        for name, g in reference.items():
            torch.testing.assert_close(got[name], g, atol=1e-6 + 1e-4 * g.abs().max().item(), rtol=1e-4,
                                       msg=lambda m: f"{kind} fused={fused} {name}: {m}")


def _post_processed_llama(seed: int):
    """A Llama whose logits are multiplied by 1.5 after the head: a post-processing minillm does not know."""
    model = _model("llama", seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)

    def scale(module, args, output):
        output.logits = output.logits * 1.5
        return output

    model.register_forward_hook(scale)
    return model


def test_unknown_post_processing_falls_back_with_one_warning(caplog):
    model = _post_processed_llama(3)
    with caplog.at_level(logging.WARNING, logger="minillm"):
        assert chunked_head_matches(model, "kd.chunked") is False
        assert chunked_head_matches(model, "kd.chunked") is False
    warnings = [r for r in caplog.records if "kd.chunked" in r.getMessage()]
    assert len(warnings) == 1 and "plain losses" in warnings[0].getMessage()
    assert chunked_head_matches(_model("gemma2", 4), "kd.chunked") is True


def test_minillm_trainer_falls_back_to_the_plain_losses(tmp_path, monkeypatch):
    """A teacher with an unknown post-processing no longer stops the default (chunked) run at its first step."""
    import minillm.models
    from minillm.cli.train import build_trainer
    from minillm.config import load_config
    from minillm.strategy import build_strategy

    real = minillm.models.load_model

    def load(cfg, *, trainable, **kwargs):
        model = real(cfg, trainable=trainable, **kwargs)
        if not trainable:
            model.register_forward_hook(lambda m, a, out: setattr(out, "logits", out.logits * 1.5) or out)
        return model

    monkeypatch.setattr(minillm.models, "load_model", load)
    cfg = load_config("configs/tiny/minillm.yaml", [f"output_dir={tmp_path}"])
    assert cfg.minillm.chunked_losses
    trainer = build_trainer(cfg, build_strategy(cfg).setup())
    assert trainer.cfg.minillm.chunked_losses is False and trainer._reuse_teacher is False
    buffer = trainer.rollout_and_score()  # scoring and a learning step run on the plain path
    first = type(buffer)(**{k: getattr(buffer, k)[:8] for k in buffer.__dataclass_fields__})
    loss, parts = trainer.micro_batch_loss(first)
    assert torch.isfinite(loss) and "single_step_kl" in parts
