"""SAN towers, sequence encoder, loss and metrics against hand-computed and literal references."""

import math

import pytest
import torch

from iisan.core.errors import ConfigError
from iisan.train.loss import debiased_in_batch_ce
from iisan.train.metrics import hr_ndcg, rank_of_target
from iisan.train.model import ItemSources
from iisan.train.san import InterTower, IntraTower, SANBlock, SANItemEncoder
from iisan.train.seqenc import SequenceEncoder
from iisan.train.settings import ModelConfig


def _set(linear, weight, bias):
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        linear.bias.copy_(torch.tensor(bias, dtype=torch.float32))


def test_san_block_init_and_a_hand_computed_case():
    torch.manual_seed(0)
    b = SANBlock(32, 8)
    assert b.down.bias.abs().sum() == 0 and b.up.bias.abs().sum() == 0
    assert b.down.weight.std().item() == pytest.approx(0.01, rel=0.2)
    b = SANBlock(2, 1)
    _set(b.down, [[1.0, -1.0]], [0.5])
    _set(b.up, [[2.0], [3.0]], [0.0, 1.0])
    # x=[1, .25]: down = 1.25, relu 1.25, up = [2.5, 4.75], + x = [3.5, 5.0]; x=[0, 1]: down -0.5 -> 0, up = [0, 1]
    assert b(torch.tensor([[1.0, 0.25], [0.0, 1.0]])).tolist() == [[3.5, 5.0], [0.0, 2.0]]


def test_intra_tower_hand_computed():
    t = IntraTower(2, 1, 1, learned_gates=True)
    _set(t.blocks[0].down, [[1.0]], [0.0])  # SANB_1(x) = x + relu(x)
    _set(t.blocks[0].up, [[1.0]], [0.0])
    _set(t.blocks[1].down, [[2.0]], [0.0])  # SANB_2(x) = x - relu(2x) + 1
    _set(t.blocks[1].up, [[-1.0]], [1.0])
    with torch.no_grad():
        t.gates.w.copy_(torch.tensor([0.0, 0.1]))
    g1 = 1 / (1 + math.exp(-1.0))  # sigmoid(0.1 / 0.1)
    # t_1 = SANB_1(.5*2 + .5*0) = 2; t_2 = SANB_2(g1*4 + (1-g1)*2) = 1 - (2 + 2*g1)
    assert t(torch.tensor([[[2.0], [4.0]]])).item() == pytest.approx(-1 - 2 * g1, abs=1e-6)


def test_fixed_gates_stay_at_half_and_are_not_trained():
    t = IntraTower(2, 4, 2, learned_gates=False)
    assert t.gates().tolist() == [0.5, 0.5] and not t.gates.w.requires_grad


def test_inter_tower_with_dtl_and_unequal_taps_pairs_the_top_taps():
    it = InterTower(taps=1, text_width=2, image_width=1, bottleneck=1, learned_gates=True)
    assert it.dtl is not None and it.dtl[0].in_features == 2 and it.dtl[0].out_features == 1
    _set(it.blocks[0].down, [[1.0]], [0.0])  # SANB(x) = x + .5 relu(x)
    _set(it.blocks[0].up, [[0.5]], [0.0])
    _set(it.dtl[0], [[1.0, 2.0]], [0.5])  # DTL(t) = t1 + 2 t2 + .5
    ht = torch.tensor([[[9.0, 9.0], [1.0, 1.0]]])  # two text taps: the top one, [1, 1], pairs with the image tap
    hv = torch.tensor([[[3.0]]])
    # X = 1 + 2 + .5 = 3.5; m = SANB(0 + .5*3 + .5*3.5) = SANB(3.25) = 3.25 + 1.625
    assert it(ht, hv).item() == pytest.approx(4.875)
    assert InterTower(2, 4, 4, 3, True).dtl is None  # VS: same width, no DTL


def test_inter_tower_projects_a_wider_image_down_to_the_text_width():
    # BERT-base + ViT-large: the authors' code runs the inter tower at the text width
    it = InterTower(taps=1, text_width=1, image_width=2, bottleneck=1, learned_gates=True)
    assert it.width == 1 and it.project == "image" and it.dtl[0].in_features == 2
    _set(it.blocks[0].down, [[1.0]], [0.0])  # SANB(x) = x + .5 relu(x)
    _set(it.blocks[0].up, [[0.5]], [0.0])
    _set(it.dtl[0], [[1.0, 2.0]], [0.5])  # DTL(v) = v1 + 2 v2 + .5
    ht, hv = torch.tensor([[[3.0]]]), torch.tensor([[[1.0, 1.0]]])
    # V = 3.5, X = 3 (the text tap, not projected); m = SANB(.5*3.5 + .5*3) = 3.25 * 1.5
    assert it(ht, hv).item() == pytest.approx(4.875)


class FakeFeatures:
    def __init__(self, kt, wt, kv, wv):
        self.shapes = {"text": (kt, wt), "image": (kv, wv)}

    def shape(self, m):
        return self.shapes[m]


def _encoder(kt, wt, kv, wv, **kw):
    cfg = ModelConfig(d=16, bottleneck=8, **kw)
    return SANItemEncoder(cfg, ItemSources(data=None, features=FakeFeatures(kt, wt, kv, wv)))


@pytest.mark.parametrize(
    "kt, wt, kv, wv, intra, inter, heads",
    [
        (7, 64, 7, 64, True, True, 3),  # VS
        (7, 128, 7, 64, True, True, 3),  # VA (DTL)
        (7, 64, 7, 128, True, True, 3),  # a wider image encoder (DTL on the image side)
        (13, 64, 7, 64, True, True, 3),  # 12+6 taps, allowed below
        (7, 32, 0, 0, True, True, 1),  # text only: inter switches itself off
        (7, 64, 7, 64, False, True, 1),  # w/o intra
        (7, 64, 7, 64, True, False, 2),  # w/o inter
    ],
)
def test_item_encoder_shapes_for_every_variant(kt, wt, kv, wv, intra, inter, heads):
    enc = _encoder(kt, wt, kv, wv, intra=intra, inter=inter, allow_unequal_taps=kt != kv and kv > 0)
    assert len(enc.heads) == heads and enc.fusion.in_features == heads * 16
    if enc.inter is not None:  # the inter tower and its head at the narrower width
        assert enc.heads["inter"].in_features == min(wt, wv) == enc.inter.blocks[0].down.in_features
    e = enc.encode(torch.randn(5, kt, wt) if kt else None, torch.randn(5, kv, wv) if kv else None)
    assert e.shape == (5, 16)
    assert (enc.cfg.text_taps, enc.cfg.text_width, enc.cfg.image_taps, enc.cfg.image_width) == (kt, wt, kv, wv)


def test_unequal_tap_counts_are_refused_unless_allowed():
    with pytest.raises(ConfigError, match=r"text input has 13 taps and the image input 7.*allow_unequal_taps: true"):
        _encoder(13, 64, 7, 64)
    assert _encoder(13, 64, 7, 64, allow_unequal_taps=True).inter.taps == 7
    assert _encoder(13, 64, 0, 0).cfg.text_taps == 13  # one modality: nothing to pair


def test_item_encoder_needs_a_modality():
    with pytest.raises(ConfigError, match="at least one modality"):
        _encoder(0, 0, 0, 0)
    with pytest.raises(ConfigError, match="cannot be switched off"):
        _encoder(2, 4, 0, 0, intra=False)


def test_sequence_encoder_is_causal_and_ignores_padding():
    torch.manual_seed(0)
    enc = SequenceEncoder(ModelConfig(d=8, max_len=5, blocks=2, heads=2, dropout=0.0)).eval()
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
                if j == pos or (ids[j] != 0 and ids[j].item() not in own):
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
    ranks = rank_of_target(scores, torch.eye(N + 1), target, history)  # users @ I.T: exactly these scores
    assert torch.equal(ranks, rank_of_target(scores, torch.eye(N + 1), target, history, item_block=7))  # blocks
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
