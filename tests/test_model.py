"""SAN towers, sequence encoder, loss and metrics against hand-computed and literal references."""

import math

import pytest
import torch

from iisan.loss import debiased_in_batch_ce
from iisan.metrics import hr_ndcg, rank_of_target
from iisan.san import InterTower, IntraTower, SANBlock, SANConfig, SANItemEncoder
from iisan.seqenc import SequenceEncoder
from iisan.errors import ConfigError


def test_san_block_init_and_formula():
    torch.manual_seed(0)
    b = SANBlock(32, 8)
    assert b.down.bias.abs().sum() == 0 and b.up.bias.abs().sum() == 0
    assert b.down.weight.std().item() == pytest.approx(0.01, rel=0.2)
    x = torch.randn(4, 32)
    assert torch.allclose(b(x), x + b.up(torch.relu(b.down(x))))


def test_intra_tower_matches_the_recursion_by_hand():
    torch.manual_seed(0)
    t = IntraTower(3, 4, 2, learned_gates=True)
    with torch.no_grad():
        t.gates.w.copy_(torch.tensor([0.0, 0.1, -0.2]))
    h = torch.randn(5, 3, 4)
    g = torch.sigmoid(torch.tensor([0.0, 0.1, -0.2]) / 0.1)
    assert g[0] == 0.5
    ref = torch.zeros(5, 4)
    for k in range(3):
        ref = t.blocks[k](g[k] * h[:, k] + (1 - g[k]) * ref)
    assert torch.allclose(t(h), ref)


def test_fixed_gates_stay_at_half_and_are_not_trained():
    t = IntraTower(2, 4, 2, learned_gates=False)
    assert t.gates().tolist() == [0.5, 0.5] and not t.gates.w.requires_grad


def test_inter_tower_with_dtl_and_unequal_taps_pairs_the_top_taps():
    torch.manual_seed(0)
    it = InterTower(taps=2, text_width=6, image_width=4, bottleneck=3, learned_gates=True)
    assert it.dtl is not None and it.dtl[0].in_features == 6 and it.dtl[0].out_features == 4
    ht, hv = torch.randn(2, 5, 6), torch.randn(2, 2, 4)
    ref, b = torch.zeros(2, 4), it.gates()
    for k in range(2):  # text taps 3, 4 pair with image taps 0, 1
        ref = it.blocks[k](ref + b[k] * hv[:, k] + (1 - b[k]) * it.dtl[k](ht[:, 3 + k]))
    assert torch.allclose(it(ht, hv), ref)
    assert InterTower(2, 4, 4, 3, True).dtl is None  # VS: same width, no DTL


@pytest.mark.parametrize("kt, wt, kv, wv, intra, inter, heads", [
    (7, 64, 7, 64, True, True, 3),    # VS
    (7, 128, 7, 64, True, True, 3),   # VA (DTL)
    (7, 32, 0, 0, True, True, 1),     # text only: inter switches itself off
    (7, 64, 7, 64, False, True, 1),   # w/o intra
    (7, 64, 7, 64, True, False, 2),   # w/o inter
])
def test_item_encoder_shapes_for_every_variant(kt, wt, kv, wv, intra, inter, heads):
    cfg = SANConfig(d=16, bottleneck=8, text_taps=kt, text_width=wt, image_taps=kv, image_width=wv, intra=intra, inter=inter)
    enc = SANItemEncoder(cfg)
    assert len(enc.heads) == heads and enc.fusion.in_features == heads * 16
    e = enc(torch.randn(5, kt, wt) if kt else None, torch.randn(5, kv, wv) if kv else None)
    assert e.shape == (5, 16)


def test_item_encoder_needs_a_modality():
    with pytest.raises(ConfigError, match="at least one modality"):
        SANConfig()
    with pytest.raises(ConfigError, match="cannot be switched off"):
        SANConfig(text_taps=2, text_width=4, intra=False)


def test_sequence_encoder_is_causal_and_ignores_padding():
    torch.manual_seed(0)
    enc = SequenceEncoder(d=8, max_len=5, blocks=2, heads=2, dropout=0.0).eval()
    x = torch.randn(1, 5, 8)
    real = torch.tensor([[False, True, True, True, True]])
    out = enc(x, real)
    x2 = x.clone()
    x2[0, 4] += 10  # change the future: earlier positions must not move
    assert torch.allclose(enc(x2, real)[0, :4], out[0, :4], atol=1e-6)
    x3 = x.clone()
    x3[0, 0] += 10  # change a padding slot: real positions must not move
    assert torch.allclose(enc(x3, real)[0, 1:], out[0, 1:], atol=1e-6)
    assert torch.isfinite(enc(x, torch.zeros(1, 5, dtype=torch.bool))).all()


def slow_loss(user, items, seqs, log_pop):
    """Eq. 6-7 written literally: one softmax per (user, position)."""
    B, S = seqs.shape
    cand = items.reshape(B * S, -1)
    ids = seqs.reshape(-1)
    total, n = 0.0, 0
    for u in range(B):
        own = set(seqs[u].tolist())
        for t in range(S - 1):
            if seqs[u, t] == 0:
                continue
            pos = u * S + t + 1
            logits = []
            for j in range(B * S):
                if j == pos:
                    logits.append((user[u, t] @ cand[j] - log_pop[ids[j]]).item())
                elif ids[j] != 0 and ids[j].item() not in own:
                    logits.append((user[u, t] @ cand[j] - log_pop[ids[j]]).item())
            target = (user[u, t] @ cand[pos] - log_pop[ids[pos]]).item()
            total += -(target - math.log(sum(math.exp(v) for v in logits)))
            n += 1
    return total / n


def test_debiased_loss_matches_literal_implementation():
    torch.manual_seed(0)
    seqs = torch.tensor([[0, 0, 3, 5, 2], [0, 1, 2, 4, 6], [7, 3, 8, 9, 1]])  # shared items across users
    pop = torch.rand(10) + 0.1
    log_pop = torch.log(pop / pop.sum())
    user, items = torch.randn(3, 4, 6), torch.randn(3, 5, 6)
    fast = debiased_in_batch_ce(user, items, seqs, log_pop)
    assert fast.item() == pytest.approx(slow_loss(user, items, seqs, log_pop), rel=1e-5)


def test_ranking_metrics_match_brute_force():
    g = torch.Generator().manual_seed(0)
    U, N = 40, 30
    scores = torch.randn(U, N + 1, generator=g)
    scores[:5, 3] = scores[:5, 4]  # some ties
    target = torch.randint(1, N + 1, (U,), generator=g)
    history = torch.randint(0, N + 1, (U, 6), generator=g)
    history[0, 0] = target[0]  # a repeated target is a miss
    ranks = rank_of_target(scores, target, history)
    hits, ndcg = 0, 0.0
    for u in range(U):
        hist = set(history[u].tolist()) - {0}
        if target[u].item() in hist:
            continue
        others = [i for i in range(1, N + 1) if i not in hist and i != target[u].item()]
        r = sum(scores[u, i] >= scores[u, target[u]] for i in others)
        assert ranks[u].item() == r
        if r < 10:
            hits += 1
            ndcg += 1 / math.log2(r + 2)
    assert ranks[0].item() == N + 1
    m = hr_ndcg(ranks, 10)
    assert m["HR@10"] == pytest.approx(hits / U) and m["NDCG@10"] == pytest.approx(ndcg / U)
