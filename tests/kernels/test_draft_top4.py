"""The draft's fused top-4 + row gather against the PyTorch ops, on CUDA or on the CPU under TRITON_INTERPRET=1:
reduced vocabularies and widths that are not powers of two, output buffers poisoned first."""

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEV = "cuda" if torch.cuda.is_available() else "cpu"

from kernels.draft_top4 import draft_top4, draft_top4_reference  # noqa: E402


@pytest.mark.parametrize("V,D,vocab_size,dtype", [(721, 576, 49152, torch.float16), (4096, 1100, 32000, torch.float16),
                                                  (37, 200, 100, torch.float32), (5000, 4096, 32000, torch.float16)])
def test_draft_top4_matches_torch(V, D, vocab_size, dtype):
    gen = torch.Generator().manual_seed(V)
    logits = torch.randn(V, generator=gen).to(DEV, dtype)
    vocab = torch.randperm(vocab_size, generator=gen)[:V].to(DEV)
    lm = torch.randn(vocab_size, D, generator=gen).to(DEV, dtype)
    top4, rows = torch.full((4,), -1, dtype=torch.long, device=DEV), torch.full((4, D), float("nan"), dtype=dtype, device=DEV)
    draft_top4(logits, vocab, lm, top4, rows)
    ref_top4, ref_rows = torch.empty_like(top4), torch.empty_like(rows)
    draft_top4_reference(logits, vocab, lm, ref_top4, ref_rows)
    assert top4.tolist() == ref_top4.tolist()  # distinct random logits: the same ids in the same order
    assert torch.equal(rows, ref_rows)


def test_draft_top4_ties_and_infinities_give_valid_distinct_ids():
    V, D = 300, 64
    logits = torch.full((V,), float("-inf"), device=DEV)
    logits[[7, 200]] = 1.0  # two equal maxima, then only -inf
    vocab = torch.arange(1000, 1000 + V, device=DEV)
    lm = torch.randn(2000, D, device=DEV)
    top4, rows = torch.full((4,), -1, dtype=torch.long, device=DEV), torch.empty(4, D, device=DEV)
    draft_top4(logits, vocab, lm, top4, rows)
    ids = top4.tolist()
    assert ids[:2] == [1007, 1200] and len(set(ids)) == 4 and all(1000 <= i < 1000 + V for i in ids)
    assert torch.equal(rows, lm[top4])


def test_draft_top4_takes_equal_logits_in_vocabulary_order():
    """Many equal logits (a draft whose rows are mostly zero): the kernel, its reference and `DraftHead.propose`
    pick the same 4, so that the one-graph and eager decoders propose alike."""
    from mpq.specee.draft import DraftHead

    V, D = 48, 32
    logits = torch.zeros(V, device=DEV)
    logits[[5, 9]] = torch.tensor([0.5, 0.25], device=DEV)
    vocab = torch.arange(100, 100 + V)
    head = DraftHead(D, 2, 2, D // 2, 8, 1e-5, vocab)
    lm = torch.randn(200, D, device=DEV)
    top4, rows = torch.empty(4, dtype=torch.long, device=DEV), torch.empty(4, D, device=DEV)
    draft_top4(logits, vocab.to(DEV), lm, top4, rows)
    ref = torch.empty_like(top4)
    draft_top4_reference(logits, vocab.to(DEV), lm, ref, torch.empty_like(rows))
    assert top4.tolist() == ref.tolist() == head.propose(logits.cpu()).tolist() == [105, 109, 100, 101]
