"""The retrieval metrics the slow, obviously-correct way, one query at a time, as the seeds compute them: the
reference the tests check utils.retrieval_metrics against, and the baseline speed.py times it against.

For each query the gallery is ranked by descending similarity (a stable sort: ties go to the lower gallery
index); then, with R relevant items, AP@k is SAKE's interpolated average precision over the top k (the
precision envelope, divided by min(k, R)) and P@k the share of relevant items in the top k (docs/metrics.md).
"""
import numpy as np

from utils import CONVENTIONS, METRIC_NAMES, metric_name


def reference_ap(relevance, num_relevant, k):
    """AP@k of one ranked 0/1 relevance list: the sum over recall steps of (recall gain x envelope precision)."""
    top = relevance[:k]
    hits = np.cumsum(top)
    precision = hits / np.arange(1, len(top) + 1)
    recall = hits / min(k, num_relevant)
    envelope = precision.copy()
    for i in range(len(envelope) - 2, -1, -1):
        envelope[i] = max(envelope[i], envelope[i + 1])
    ap, previous = 0.0, 0.0
    for i in range(len(top)):
        if recall[i] != previous:
            ap += (recall[i] - previous) * envelope[i]
            previous = recall[i]
    return ap


def torchmetrics_ap(relevance, k):
    """torchmetrics 1.0's retrieval_average_precision(top_k=k) of one ranked 0/1 relevance list: the mean, over
    the relevant items in the top k, of (their count so far / their rank); 0 when there is none."""
    positions = np.flatnonzero(relevance[:k]) + 1
    if not len(positions):
        return 0.0
    return float(np.mean(np.arange(1, len(positions) + 1) / positions))


def reference_metrics(queries, query_labels, gallery, gallery_labels, scipy_cosine=False):
    """Per-query metrics (arrays in query order) of unit vectors: mAP@200, mAP@all, P@100, P@200 in SAKE's
    convention, and the same names prefixed torchmetrics_ in torchmetrics 1.0's (retrieval_average_precision and
    retrieval_precision with top_k, adaptive_k off). Similarity is the dot product, or with `scipy_cosine` the
    seeds' SciPy cosine distance."""
    if scipy_cosine:
        from scipy.spatial.distance import cdist
        distances = cdist(queries, gallery, 'cosine')
    out = {name: [] for convention in CONVENTIONS for name in (metric_name(n, convention) for n in METRIC_NAMES)}
    for i, (query, label) in enumerate(zip(queries, query_labels)):
        order = np.argsort(distances[i] if scipy_cosine else -(gallery @ query), kind='stable')
        relevance = (gallery_labels[order] == label).astype(np.float64)
        num_relevant = relevance.sum()
        out['mAP@200'].append(reference_ap(relevance, num_relevant, 200))
        out['mAP@all'].append(reference_ap(relevance, num_relevant, len(gallery)))
        out['P@100'].append(relevance[:100].mean())
        out['P@200'].append(relevance[:200].mean())
        out['torchmetrics_mAP@200'].append(torchmetrics_ap(relevance, 200))
        out['torchmetrics_mAP@all'].append(torchmetrics_ap(relevance, len(gallery)))
        out['torchmetrics_P@100'].append(relevance[:100].sum() / 100)
        out['torchmetrics_P@200'].append(relevance[:200].sum() / 200)
    return {name: np.array(values) for name, values in out.items()}


def reference_means(queries, query_labels, gallery, gallery_labels):
    """The mean of each metric over the queries, and each convention's 'precise' (the mean of its four)."""
    result = {name: float(values.mean()) for name, values in
              reference_metrics(queries, query_labels, gallery, gallery_labels).items()}
    for convention in CONVENTIONS:
        result[metric_name('precise', convention)] = float(np.mean([result[metric_name(name, convention)]
                                                                    for name in METRIC_NAMES]))
    return result
