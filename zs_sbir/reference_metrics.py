"""The retrieval metrics the slow, obviously-correct way, one query at a time, as the seeds compute them: the
reference the tests check utils.retrieval_metrics against, and the baseline speed.py times it against.

For each query the gallery is ranked by descending similarity (a stable sort: ties go to the lower gallery
index); then, with R relevant items, AP@k is SAKE's interpolated average precision over the top k (the
precision envelope, divided by min(k, R)) and P@k the share of relevant items in the top k (docs/metrics.md).
"""
import numpy as np

from utils import METRIC_NAMES


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


def reference_metrics(queries, query_labels, gallery, gallery_labels, scipy_cosine=False):
    """Per-query metrics (arrays in query order) of unit vectors: mAP@200, mAP@all, P@100, P@200 and
    mAP@200_found (divided by the relevant items found in the top 200, no envelope). Similarity is the
    dot product, or with `scipy_cosine` the seeds' SciPy cosine distance."""
    if scipy_cosine:
        from scipy.spatial.distance import cdist
        distances = cdist(queries, gallery, 'cosine')
    out = {name: [] for name in (*METRIC_NAMES, 'mAP@200_found')}
    for i, (query, label) in enumerate(zip(queries, query_labels)):
        order = np.argsort(distances[i] if scipy_cosine else -(gallery @ query), kind='stable')
        relevance = (gallery_labels[order] == label).astype(np.float64)
        num_relevant = relevance.sum()
        out['mAP@200'].append(reference_ap(relevance, num_relevant, 200))
        out['mAP@all'].append(reference_ap(relevance, num_relevant, len(gallery)))
        out['P@100'].append(relevance[:100].mean())
        out['P@200'].append(relevance[:200].mean())
        top = relevance[:200]
        out['mAP@200_found'].append((np.cumsum(top) / np.arange(1, len(top) + 1) * top).sum() / max(top.sum(), 1))
    return {name: np.array(values) for name, values in out.items()}


def reference_means(queries, query_labels, gallery, gallery_labels):
    """The mean of each metric over the queries, and 'precise' (the mean of the four main ones)."""
    result = {name: float(values.mean()) for name, values in
              reference_metrics(queries, query_labels, gallery, gallery_labels).items()}
    result['precise'] = float(np.mean([result[name] for name in METRIC_NAMES]))
    return result
