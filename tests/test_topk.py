"""Top-k teacher rows (minillm.losses.topk.TopKLogprobs) in the chunked losses.

Oracle: a TopKLogprobs must act exactly like the dense [B, L, V] tensor it stands for (expand_topk of all rows),
for every chunked loss that takes ``teacher_logprobs``, values and gradients, whatever the chunking, while only
a chunk's rows are ever expanded.
"""

from __future__ import annotations

import pytest
import torch

from minillm.losses import chunked as chunked_losses
from minillm.losses import IGNORE_INDEX
from minillm.losses.topk import TopKLogprobs, expand_topk

B, L, H, V, K = 3, 7, 8, 40, 6


def teacher_topk(storage: torch.dtype = torch.float16, k: int = K) -> TopKLogprobs:
    g = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(2.0 * torch.randn(B, L, V, generator=g), -1)
    values, ids = logp.topk(k, -1)
    return TopKLogprobs(ids.to(torch.int32), values.to(storage), V)


def student(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g).requires_grad_()
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    return hidden, head


def test_rows_are_the_dense_rows_and_shapes_are_checked():
    topk = teacher_topk()
    dense = topk.dense()
    assert topk.shape == (B, L, V) and dense.shape == (B, L, V)
    torch.testing.assert_close(dense, expand_topk(topk.ids, topk.logprobs, V), rtol=0, atol=0)
    index = torch.tensor([20, 0, 13, 5])
    assert torch.equal(topk.rows(index, "cpu"), dense.reshape(-1, V)[index])
    with pytest.raises(ValueError, match="one shape"):
        TopKLogprobs(topk.ids, topk.logprobs[..., :-1], V)
    with pytest.raises(ValueError, match="k=6 must lie in"):
        TopKLogprobs(topk.ids, topk.logprobs, 5)


def labels_and_mask():
    labels = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(2))
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[2, 5:] = IGNORE_INDEX  # padding
    return labels, labels != IGNORE_INDEX


LOSSES = {
    "single_step_kl": lambda h, head, t, lab, m, **kw: chunked_losses.chunked_single_step_kl(
        h, head, m, teacher_logprobs=t, **kw),
    "pt_loss": lambda h, head, t, lab, m, **kw: chunked_losses.chunked_pt_loss(
        h, head, lab, teacher_logprobs=t, kd_ratio=0.3, **kw),
    "kd_loss_jsd_T2": lambda h, head, t, lab, m, **kw: chunked_losses.chunked_kd_loss(
        h, head, lab, teacher_logprobs=t, kd_ratio=0.6, divergence="jsd", temperature=2.0, **kw).loss,
    "divergence_srkl": lambda h, head, t, lab, m, **kw: chunked_losses.chunked_divergence(
        h, head, m, "srkl", teacher_logprobs=t, **kw),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "checkpointed"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_chunked_losses_take_topk_rows_as_the_dense_tensor(name, fused):
    labels, mask = labels_and_mask()
    topk = teacher_topk()
    results = []
    for teacher in (topk.dense(), topk):
        hidden, head = student()
        loss = LOSSES[name](hidden, head, teacher, labels, mask, chunk_size=4, fused=fused)
        loss.backward()
        results.append((loss.detach(), hidden.grad, head.weight.grad))
    (dense_loss, *dense_grads), (topk_loss, *topk_grads) = results
    torch.testing.assert_close(topk_loss, dense_loss, rtol=0, atol=0)
    for a, b in zip(topk_grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_only_a_chunks_rows_are_expanded(monkeypatch):
    """The expansion never sees more than chunk_size rows at once (no [B, L, V] tensor is built)."""
    import minillm.losses.topk as topk_module

    seen = []
    original = topk_module.expand_topk

    def spy(ids, logprobs, vocab_size):
        seen.append(ids.shape[0])
        return original(ids, logprobs, vocab_size)

    monkeypatch.setattr(topk_module, "expand_topk", spy)
    labels, _ = labels_and_mask()
    hidden, head = student()
    chunked_losses.chunked_pt_loss(hidden, head, labels, teacher_logprobs=teacher_topk(), chunk_size=4).backward()
    valid = int((labels != IGNORE_INDEX).sum())
    assert max(seen) <= 4 and sum(seen) == valid
