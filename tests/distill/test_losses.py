"""Each loss is zero when the student equals the teacher and positive otherwise."""

import pytest
import torch

from slimkit.distill import losses as L


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 5, 16, generator=g)
    return a, a + 0.3 * torch.randn(8, 5, 16, generator=g)


def test_soft_kl_zero_for_equal_logits_and_scaled_by_t_squared(pair):
    a, b = pair[0][:, 0], pair[1][:, 0]
    assert L.soft_kl(a, a.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert L.soft_kl(b, a, 4.0).item() > 0
    # At high temperature KL ~ mean squared logit difference / (2 T^2 N): times T^2 it stays put.
    k8, k16 = L.soft_kl(b, a, 8.0).item(), L.soft_kl(b, a, 16.0).item()
    assert k16 == pytest.approx(k8, rel=0.1)


def test_soft_kl_matches_the_definition(pair):
    s, t = pair[1][:, 0], pair[0][:, 0]
    p_t = torch.softmax(t / 2.0, -1)
    expected = (p_t * (p_t.log() - torch.log_softmax(s / 2.0, -1))).sum(-1).mean() * 4.0
    torch.testing.assert_close(L.soft_kl(s, t, 2.0), expected)


def test_hard_ce():
    logits = torch.tensor([[10.0, -10.0], [-10.0, 10.0]])
    assert L.hard_ce(logits, torch.tensor([0, 1])).item() < 1e-6
    assert L.hard_ce(logits, torch.tensor([1, 0])).item() > 10


def test_mse_and_cosine_zero_for_equal_and_positive_otherwise(pair):
    a, b = pair
    for fn in (L.mse, L.cosine):
        assert fn(a, a.clone()).item() == pytest.approx(0.0, abs=1e-6)
        assert fn(b, a).item() > 0


def test_masked_positions_do_not_count(pair):
    a, b = pair
    mask = torch.ones(8, 5)
    mask[:, 3:] = 0
    b_masked_garbage = b.clone()
    b_masked_garbage[:, 3:] = 1e6  # padding positions: anything
    for fn in (L.mse, L.cosine):
        torch.testing.assert_close(fn(b_masked_garbage, a, mask), fn(b[:, :3], a[:, :3]))


def test_cosine_on_feature_maps_compares_channel_vectors():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 6, 3, 5, generator=g)
    scale = torch.rand(2, 1, 3, 5, generator=g) + 0.5  # each position's channel vector rescaled: same direction
    torch.testing.assert_close(L.cosine(teacher * scale, teacher), torch.tensor(0.0), atol=1e-6, rtol=0)
    student = torch.randn(2, 6, 3, 5, generator=g)
    per_position = 1 - torch.nn.functional.cosine_similarity(student.movedim(1, -1), teacher.movedim(1, -1), dim=-1)
    torch.testing.assert_close(L.cosine(student, teacher), per_position.mean())
