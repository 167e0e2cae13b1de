"""PP components against hand-computed values on small tensors."""

import math

import pytest
import torch
from prunekit_plugins.pp.fusion import FixedRatio, HistoryOnly, ImportanceScaled, ProbeOnly
from prunekit_plugins.pp.history import Ema, Frozen, RunningMean
from prunekit_plugins.pp.metric import PPScore
from prunekit_plugins.pp.probes import FullBatch, RandomProbe, ResidualRank

from prunekit.components import ATTN, MLP


def _residual_with_norms(norms):
    """A [B, T, 2] tensor whose per-token L2 norms are ``norms`` ([B, T])."""
    n = torch.tensor(norms, dtype=torch.float32)
    return torch.stack([n, torch.zeros_like(n)], dim=-1)


def test_residual_rank_positions_then_samples():
    # B=4, T=8; column L2 norms over rows decide positions, then rows on those positions
    norms = [
        [1, 9, 1, 1, 1, 1, 8, 1],
        [1, 9, 1, 1, 1, 1, 8, 1],
        [1, 1, 1, 7, 1, 1, 1, 1],
        [1, 1, 1, 7, 1, 1, 1, 9],
    ]
    h = _residual_with_norms(norms)
    mask = torch.ones(4, 8, dtype=torch.bool)
    sel = ResidualRank(ratio_seq=0.5, ratio_batch=0.5, force_first_below=0)
    rows, cols = sel(h, mask)
    # column scores: col1 sqrt(81+81+1+1), col6 sqrt(64+64+1+1), col3 sqrt(1+1+49+49), col7 sqrt(1+1+1+81)
    assert cols.tolist() == [1, 3, 6, 7]
    # row scores on cols [1,3,6,7]: row0 sqrt(81+1+64+1)=12.1, row1 same, row2 sqrt(1+49+1+1)=7.2,
    # row3 sqrt(1+49+1+81)=11.5 -> top 2 = rows 0 and 1 (ties broken either way within 0/1)
    assert rows.tolist() == [0, 1]


def test_token_zero_rule_and_minimum_two_tokens():
    norms = [[1, 2, 3, 4, 5, 6, 7, 8]]
    h = _residual_with_norms(norms)
    mask = torch.ones(1, 8, dtype=torch.bool)
    # ceil(0.1*8)=1 -> at least 2 tokens: positions 6, 7; <= 10 tokens so the smallest (6)
    # is replaced by token 0
    rows, cols = ResidualRank(ratio_seq=0.1, ratio_batch=1.0)(h, mask)
    assert cols.tolist() == [0, 7] and rows.tolist() == [0]
    # with the rule off, the ranked tokens stay
    _, cols = ResidualRank(ratio_seq=0.1, ratio_batch=1.0, force_first_below=0)(h, mask)
    assert cols.tolist() == [6, 7]
    # more than force_first_below tokens: no forcing
    long = _residual_with_norms([list(range(1, 41))])
    _, cols = ResidualRank(ratio_seq=0.5, ratio_batch=1.0)(
        long, torch.ones(1, 40, dtype=torch.bool)
    )
    assert cols.tolist() == list(range(20, 40))


def test_batch_count_is_ceiling_of_ratio():
    h = torch.randn(20, 16, 4)
    rows, cols = ResidualRank()(h, torch.ones(20, 16, dtype=torch.bool))
    assert len(rows) == 1 and len(cols) == 8  # ceil(0.05*20)=1, ceil(0.5*16)=8
    rows, _ = ResidualRank(ratio_batch=0.1)(h, torch.ones(21, 16, dtype=torch.bool)[:20])
    assert len(rows) == 2


def test_pads_never_enter_the_probe():
    h = torch.randn(3, 10, 4) * 5
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, :4] = False  # left padding
    mask[1, 7:] = False  # right padding
    mask[2, :] = False  # an all-pad row
    h[~mask] = 1e6  # huge pads must not win
    rows, cols = ResidualRank(ratio_seq=0.5, ratio_batch=1.0)(h, mask)
    assert 2 not in rows.tolist()
    assert mask[rows][:, cols].any(0).all()
    rows, cols = FullBatch()(h, mask)
    assert rows.tolist() == [0, 1] and cols.tolist() == list(range(10))


def test_random_probe_is_seeded_and_sorted():
    h = torch.randn(20, 32, 4)
    mask = torch.ones(20, 32, dtype=torch.bool)
    a = RandomProbe(seed=3)(h, mask)
    b = RandomProbe(seed=3)(h, mask)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert torch.equal(a[1], a[1].sort().values) and len(a[1]) == 16


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, "x"])
def test_probe_ratio_outside_range_rejected(bad):
    with pytest.raises(ValueError, match="ratio_seq"):
        ResidualRank(ratio_seq=bad)


def test_importance_scaled_fusion_by_hand():
    P = torch.tensor([[1.0, 4.0], [3.0, 0.0]])
    G = torch.tensor([[1.0, 1.0], [1.0, 2.0]])
    S = ImportanceScaled(eps=0.0)(P, G)
    # F = (P^2 + G^2)/(P + G): [[1, 17/5], [10/4, 2]]
    torch.testing.assert_close(S, torch.tensor([1 + 2.5, 17 / 5 + 2.0]))
    torch.testing.assert_close(ImportanceScaled()(P, None), P.sum(0))
    torch.testing.assert_close(ProbeOnly()(P, G), P.sum(0))
    torch.testing.assert_close(HistoryOnly()(P, G), G.sum(0))
    torch.testing.assert_close(FixedRatio(0.25)(P, G), (0.25 * P + 0.75 * G).sum(0))


def test_ema_updates_kept_channels_only():
    H = torch.ones(4, 3)  # 4 positions, 3 channels
    kept = torch.tensor([0, 2])
    x = torch.tensor([[[2.0, 4.0], [0.0, 0.0], [1.0, 1.0]]])  # [B=1, T=3, K=2]
    mask = torch.ones(1, 3, dtype=torch.bool)
    pos = torch.tensor([[0, 1, 2]])
    Ema(momentum=0.9).update(H, {}, kept, x, mask, pos)
    expected = torch.ones(4, 3)
    expected[0, 0] = 0.9 + 0.1 * 4
    expected[0, 2] = 0.9 + 0.1 * 16
    expected[1, 0] = expected[1, 2] = 0.9
    expected[2, 0] = expected[2, 2] = 1.0
    torch.testing.assert_close(H, expected)  # channel 1 (pruned) and position 3 untouched


def test_ema_ignores_pads_and_uses_true_positions():
    H = torch.zeros(4, 1)
    x = torch.tensor([[[9.0], [2.0]], [[4.0], [9.0]]])  # [2, 2, 1]
    mask = torch.tensor([[False, True], [True, False]])
    pos = torch.tensor([[0, 0], [0, 1]])  # row 0 left-padded
    Ema(momentum=0.5).update(H, {}, None, x, mask, pos)
    # position 0 sees 2.0 (row 0) and 4.0 (row 1): mean of squares (4+16)/2 = 10
    torch.testing.assert_close(H[:, 0], torch.tensor([5.0, 0.0, 0.0, 0.0]))


def test_running_mean_and_frozen():
    H = torch.full((2, 1), 2.0)
    rm = RunningMean()
    state = rm.init_state(H, calibration_samples=3)
    rm.update(
        H,
        state,
        None,
        torch.tensor([[[3.0], [1.0]]]),
        torch.ones(1, 2, dtype=torch.bool),
        torch.tensor([[0, 1]]),
    )
    torch.testing.assert_close(H[:, 0], torch.tensor([(2 * 3 + 9) / 4, (2 * 3 + 1) / 4]))
    H2 = H.clone()
    Frozen().update(
        H, {}, None, torch.ones(1, 2, 1), torch.ones(1, 2, dtype=torch.bool), torch.tensor([[0, 1]])
    )
    assert torch.equal(H, H2)


class _Layer:
    def __init__(self, weight, head_dim):
        self.w = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.w.weight.data = weight
        self.head_dim = head_dim

    def output_projection(self, group):
        return self.w

    def unit_width(self, group):
        return self.head_dim if group == ATTN else 1


def test_pp_score_by_hand():
    W = torch.tensor([[1.0, 2.0, 0.5, 1.0], [1.0, 0.0, 0.5, 2.0]])  # [d_out=2, D=4]
    S = torch.tensor([1.0, 2.0, 3.0, 0.5])
    mlp = PPScore().prepare(_Layer(W, 1), MLP)({"S": S})
    c = [math.sqrt(1 + 1), math.sqrt(16), math.sqrt(2 * 0.5**4), math.sqrt(1 + 16)]
    torch.testing.assert_close(mlp, torch.tensor([S[i].item() * c[i] for i in range(4)]))
    heads = PPScore().prepare(_Layer(W, 2), ATTN)({"S": S})
    # head h: sqrt(sum_{j in h} S_j^2 sum_i W_ij^4)
    h0 = math.sqrt(1 * 2 + 4 * 16)
    h1 = math.sqrt(9 * 2 * 0.5**4 + 0.25 * 17)
    torch.testing.assert_close(heads, torch.tensor([h0, h1]))


def test_pp_score_heads_summed_by_hand():
    # the ablation: a head's score is the sum of its channels' S_j c_j (the reference: L2)
    W = torch.tensor([[1.0, 2.0, 0.5, 1.0], [1.0, 0.0, 0.5, 2.0]])
    S = torch.tensor([1.0, 2.0, 3.0, 0.5])
    c = [math.sqrt(2), 4.0, math.sqrt(2 * 0.5**4), math.sqrt(17)]
    heads = PPScore(heads="sum").prepare(_Layer(W, 2), ATTN)({"S": S})
    torch.testing.assert_close(heads, torch.tensor([1 * c[0] + 2 * c[1], 3 * c[2] + 0.5 * c[3]]))
    # channels are scored alike either way
    torch.testing.assert_close(
        PPScore(heads="sum").prepare(_Layer(W, 1), MLP)({"S": S}),
        PPScore().prepare(_Layer(W, 1), MLP)({"S": S}),
    )
    with pytest.raises(ValueError, match="heads must be one of l2, sum"):
        PPScore(heads="max")
