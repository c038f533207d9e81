"""FID / KID against closed forms, top-k accuracy, and the judge on the committed fixture."""

from pathlib import Path

import pytest
import torch

from dreamlab.eval.metrics import fid, kid, topk_accuracy


def test_fid_of_gaussians_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    d, n = 8, 200_000
    a = torch.randn(n, d, generator=g)
    b = torch.randn(n, d, generator=g) * 2 + 1  # N(1, 4 I)
    # ||mu||^2 + tr(I + 4I - 2 * 2I) = d + d
    assert fid(a, b) == pytest.approx(2 * d, rel=0.02)
    assert fid(a, a) == pytest.approx(0, abs=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_positive_otherwise():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2000, 16, generator=g), torch.randn(2000, 16, generator=g)
    same, _ = kid(a, b, subsets=20, subset_size=500)
    diff, _ = kid(a, b + 0.5, subsets=20, subset_size=500)
    assert abs(same) < 0.01 < diff


def test_topk_accuracy():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    acc = topk_accuracy(logits, torch.tensor([0, 1, 2]), ks=(1, 2))
    assert acc[1] == pytest.approx(1 / 3) and acc[2] == pytest.approx(2 / 3)


def test_judge_trains_and_round_trips(tmp_path):
    from dreamlab.eval.judge import JudgeConfig, judge_outputs, load_judge, train_judge

    out = train_judge(JudgeConfig(data=str(Path(__file__).parent / "fixtures" / "emoji"), out=str(tmp_path), epochs=1, batch_size=16))
    judge, bases, labels = load_judge(out)
    feats, logits = judge_outputs(judge, torch.zeros(3, 4, 64, 64))
    assert feats.shape == (3, 256) and logits.shape == (3, len(bases)) and len(labels) == len(bases)
