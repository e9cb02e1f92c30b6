"""retrieval_metrics against hand-worked examples and the slow per-query reference (reference_metrics.py), written
from the definitions in docs/metrics.md."""
import numpy as np
import pytest
import torch

from helpers import DEVICE
from zs_sbir.reference_metrics import reference_means as reference_metrics
from utils import METRIC_NAMES, rank_gallery, retrieval_metrics


def ranked_gallery(relevance):
    """A 2-d query and gallery whose ranking is exactly the given order; labels 1 = relevant."""
    angles = np.linspace(0, 1.2, len(relevance))
    gallery = np.stack([np.cos(angles), np.sin(angles)], 1)
    return np.array([[1.0, 0.0]]), np.array([1]), gallery, np.array(relevance)


def test_hand_worked_example_with_envelope():
    # ranks:          1  2  3  4  5   relevant at 2, 4, 5: precision 1/2, 2/4, 3/5
    q, ql, g, gl = ranked_gallery([0, 1, 0, 1, 1])
    m = retrieval_metrics(q, ql, g, gl, map_ks=(4,), p_ks=(2, 4))
    # envelope at ranks 2, 4, 5 is 0.6 everywhere -> AP@all = 0.6 (without envelope it would be 0.5333)
    assert m['mAP@all'] == pytest.approx(0.6)
    # top 4: relevant at 2 and 4 (precision 1/2, 1/2), divided by min(4, R=3) = 3
    assert m['mAP@4'] == pytest.approx(1 / 3)
    assert m['P@2'] == pytest.approx(0.5) and m['P@4'] == pytest.approx(0.5)
    # torchmetrics 1.0: no envelope; AP@k divided by the 2 found in the top 4
    assert m['torchmetrics_mAP@all'] == pytest.approx((1 / 2 + 2 / 4 + 3 / 5) / 3)
    assert m['torchmetrics_mAP@4'] == pytest.approx(0.5)
    assert m['torchmetrics_P@2'] == pytest.approx(0.5) and m['torchmetrics_P@4'] == pytest.approx(0.5)


def test_hand_worked_example_with_ties_and_negative_scores():
    """Cosines 0.5, -0.2, 0.5, -0.2, -0.7 with relevance 0, 1, 1, 0, 1: ties go to the lower gallery index, so the
    ranking is 0, 2, 1, 3, 4 and the relevant ranks are 2, 3, 5. torchmetrics 1.0 counts the relevant photos of
    negative cosine (1.8 and later drop them, and would give AP@all 1/2)."""
    cosines = np.array([0.5, -0.2, 0.5, -0.2, -0.7])
    gallery = np.stack([cosines, np.sqrt(1 - cosines ** 2)], 1)
    m = retrieval_metrics(np.array([[1.0, 0.0]]), [1], gallery, np.array([0, 1, 1, 0, 1]), map_ks=(2,), p_ks=(2, 4, 10))
    assert m['torchmetrics_mAP@all'] == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3)
    assert m['mAP@all'] == pytest.approx((2 / 3 + 2 / 3 + 3 / 5) / 3)  # SAKE's envelope lifts rank 2 to 2/3
    assert m['torchmetrics_mAP@2'] == pytest.approx(1 / 2) and m['mAP@2'] == pytest.approx(1 / 2 / 2)
    assert (m['torchmetrics_P@2'], m['torchmetrics_P@4'], m['torchmetrics_P@10']) == pytest.approx((1 / 2, 2 / 4, 3 / 10))
    assert m['P@10'] == pytest.approx(3 / 5)  # SAKE divides by min(k, gallery size)
    # precise: the mean of mAP@2, mAP@all, P@2, P@4, P@10 here
    assert m['torchmetrics_precise'] == pytest.approx(np.mean([1 / 2, (1 / 2 + 2 / 3 + 3 / 5) / 3, 1 / 2, 2 / 4, 3 / 10]))


def test_hand_worked_perfect_and_worst_rankings():
    q, ql, g, gl = ranked_gallery([1, 1, 0, 0, 0])
    m = retrieval_metrics(q, ql, g, gl, map_ks=(1,), p_ks=(1, 5))
    assert m['mAP@all'] == pytest.approx(1.0) and m['mAP@1'] == pytest.approx(1.0)
    assert m['P@1'] == 1.0 and m['P@5'] == pytest.approx(0.4)
    q, ql, g, gl = ranked_gallery([0, 0, 0, 1, 1])
    m = retrieval_metrics(q, ql, g, gl, map_ks=(3,), p_ks=(3,))
    assert m['mAP@all'] == pytest.approx((2 / 5 + 2 / 5) / 2)  # envelope lifts rank 4's 1/4 to 2/5
    assert m['mAP@3'] == 0.0 and m['P@3'] == 0.0


def clustered(num_queries, num_gallery, num_classes, dim, spread, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim))
    ql, gl = rng.integers(0, num_classes, num_queries), rng.integers(0, num_classes, num_gallery)
    gl[:num_classes] = np.arange(num_classes)  # every class has a photo
    q = centres[ql] + spread * rng.normal(size=(num_queries, dim))
    g = centres[gl] + spread * rng.normal(size=(num_gallery, dim))
    return q / np.linalg.norm(q, axis=1, keepdims=True), ql, g / np.linalg.norm(g, axis=1, keepdims=True), gl


@pytest.mark.parametrize('sizes', [(40, 300, 5, 16, 0.5), (70, 450, 12, 8, 3.0), (25, 150, 3, 32, 1.0),
                                   (30, 80, 4, 4, 10.0)])
@pytest.mark.parametrize('memory_mb', [1024, 0.02])  # one block per class, or many tiny blocks
def test_matches_reference(sizes, memory_mb):
    q, ql, g, gl = clustered(*sizes, seed=sum(sizes[:3]))
    ours = retrieval_metrics(torch.from_numpy(q), torch.from_numpy(ql), torch.from_numpy(g), torch.from_numpy(gl),
                             max_memory_mb=memory_mb)
    expected = reference_metrics(q, ql, g, gl)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name
    assert 0 < ours['mAP@all'] < 1


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_matches_reference_on_the_test_device(dtype):
    # ZS_SBIR_TEST_DEVICE=cuda: the GPU path (its own sort) must give the reference's numbers too
    q, ql, g, gl = clustered(60, 400, 7, 16, 1.0, seed=11)
    ours = retrieval_metrics(torch.from_numpy(q).to(dtype), ql, torch.from_numpy(g).to(dtype), gl, device=DEVICE,
                             max_memory_mb=0.05)
    expected = reference_metrics(q.astype(np.float32).astype(float) if dtype == torch.float32 else q, ql,
                                 g.astype(np.float32).astype(float) if dtype == torch.float32 else g, gl)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-6 if dtype == torch.float32 else 1e-12), name


def test_heavy_ties_rank_lower_gallery_index_first():
    rng = np.random.default_rng(0)
    # few distinct one-hot-like vectors, each repeated many times: most similarities tie exactly
    basis = np.eye(6)[:, :4]
    g_idx, q_idx = rng.integers(0, 6, 260), rng.integers(0, 6, 40)
    g, q = basis[g_idx], basis[q_idx]
    g[g_idx >= 4] = np.array([0.6, 0.8, 0, 0])  # rows 4, 5 of the basis are zero: give them a direction
    gl, ql = rng.integers(0, 3, 260), rng.integers(0, 3, 40)
    ours = retrieval_metrics(q, ql, g, gl, max_memory_mb=0.005)
    expected = reference_metrics(q, ql, g, gl)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name
    # tie order matters: reversing the gallery changes the result, so the tie rule is really exercised
    flipped = retrieval_metrics(q, ql, g[::-1].copy(), gl[::-1].copy())
    assert flipped['mAP@all'] != pytest.approx(ours['mAP@all'], abs=1e-6)


def test_k_larger_than_gallery():
    q, ql, g, gl = clustered(20, 60, 3, 8, 1.0, seed=1)
    m = retrieval_metrics(q, ql, g, gl)
    assert m['mAP@200'] == pytest.approx(m['mAP@all'])  # top 200 of 60 is everything
    expected = reference_metrics(q, ql, g, gl)
    assert m['P@100'] == pytest.approx(expected['P@100'])  # hits in the whole gallery / 60
    per = retrieval_metrics(q, ql, g, gl, per_query=True)
    counts = np.array([(gl == label).sum() for label in ql])
    assert np.allclose(per['P@200'].numpy(), counts / 60)


def test_per_query_values_and_input_types():
    q, ql, g, gl = clustered(30, 120, 4, 8, 1.0, seed=2)
    per = retrieval_metrics(q, ql, g, gl, per_query=True)
    means = retrieval_metrics(torch.tensor(q, dtype=torch.float32), list(ql), torch.tensor(g, dtype=torch.float32), gl)
    assert set(per) == set(means) == {*METRIC_NAMES, 'precise', *(f'torchmetrics_{n}' for n in (*METRIC_NAMES, 'precise'))}
    for name, values in per.items():
        assert values.shape == (30,) and values.dtype == torch.float64
        assert values.mean().item() == pytest.approx(means[name], abs=1e-6)
        assert ((values >= 0) & (values <= 1)).all()
    single = reference_metrics(q[4:5], ql[4:5], g, gl)
    assert per['mAP@all'][4].item() == pytest.approx(single['mAP@all'])


def test_torchmetrics_map_at_200_reads_higher_than_sakes():
    q, ql, g, gl = clustered(50, 1200, 4, 16, 1.5, seed=3)  # R ~ 300 > 200, few hits in the top 200
    m = retrieval_metrics(q, ql, g, gl)
    assert m['torchmetrics_mAP@200'] > m['mAP@200'] + 0.05  # divided by the hits found, not by min(200, R)
    assert m['torchmetrics_mAP@all'] < m['mAP@all']  # no envelope


def test_query_class_missing_from_gallery_is_an_error():
    q, ql, g, gl = clustered(10, 30, 3, 4, 1.0, seed=4)
    ql[3] = 7
    with pytest.raises(ValueError, match=r'query classes \[7\] have no item in the gallery'):
        retrieval_metrics(q, ql, g, gl)


def test_shape_errors():
    with pytest.raises(ValueError, match='expected'):
        retrieval_metrics(np.zeros((3, 4)), [0, 0, 0], np.zeros((3, 5)), [0, 0, 0])
    with pytest.raises(ValueError, match='one label per vector'):
        retrieval_metrics(np.zeros((3, 4)), [0, 0], np.zeros((3, 4)), [0, 0, 0])


def test_cpu_key_sort_ranks_exactly_like_a_stable_sort():
    rng = np.random.default_rng(5)
    values = rng.choice(np.array([-1.0, -0.5, -0.0, 0.0, 1e-30, -1e-30, 0.25, 0.7, 1.0], dtype=np.float32), (50, 300))
    values[:25] += rng.normal(scale=0.3, size=(25, 300)).astype(np.float32) * (rng.random((25, 300)) < 0.5)
    similarity = torch.from_numpy(values)
    expected = torch.sort(similarity, dim=1, descending=True, stable=True).indices
    assert torch.equal(rank_gallery(similarity), expected)
    assert torch.equal(rank_gallery(similarity.double()), expected)  # the float64 path is the stable sort


def test_float32_inputs_with_ties_match_reference():
    rng = np.random.default_rng(6)
    basis = np.eye(5, dtype=np.float32)
    g, q = basis[rng.integers(0, 5, 300)], basis[rng.integers(0, 5, 30)]
    gl, ql = rng.integers(0, 4, 300), rng.integers(0, 4, 30)
    ours = retrieval_metrics(torch.from_numpy(q), ql, torch.from_numpy(g), gl)
    expected = reference_metrics(q.astype(float), ql, g.astype(float), gl)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name


def test_cosine_ignores_vector_length():
    q, ql, g, gl = clustered(20, 100, 4, 8, 1.0, seed=7)
    scales = np.random.default_rng(7).uniform(0.1, 10, size=(100, 1))
    assert retrieval_metrics(q, ql, g * scales, gl) == pytest.approx(retrieval_metrics(q * 3, ql, g, gl), abs=1e-12)
