"""Benchmarks that print figures (never pass/fail).

    python bench.py metrics                 # retrieval metrics at Sketchy and TU-Berlin size, CPU (+GPU if any)
    python bench.py metrics --quick         # small sizes, seconds

`metrics` times utils.retrieval_metrics against a per-query implementation in the seeds' style
(SciPy cosine distances, one NumPy argsort per query, the precision envelope in a Python loop over
ranks) on the same embeddings, in the same run. The slow one runs on a subsample of the queries and
is scaled up to all of them. Each measurement runs in a fresh process so its peak memory is its own.
"""
import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from utils import retrieval_metrics

# (queries, gallery, classes): the zero-shot test sets the seeds evaluate on
SIZES = {'sketchy': (12694, 12553, 21), 'tuberlin': (2400, 27989, 30), 'quick': (1500, 2000, 10)}
MAIN = ('mAP@200', 'mAP@all', 'P@100', 'P@200')


def seed_style_metrics(queries, query_labels, gallery, gallery_labels):
    """Per-query metrics the way the seeds compute them: a loop over queries and over ranks."""
    from scipy.spatial.distance import cdist
    distances = cdist(queries, gallery, 'cosine')
    per_query = {name: [] for name in MAIN}
    for i in range(len(queries)):
        order = np.argsort(distances[i], kind='stable')
        relevance = (gallery_labels[order] == query_labels[i]).astype(np.float64)
        num_relevant = relevance.sum()
        per_query['mAP@200'].append(_envelope_ap(relevance[:200], min(200, num_relevant)))
        per_query['mAP@all'].append(_envelope_ap(relevance, num_relevant))
        per_query['P@100'].append(relevance[:100].mean())
        per_query['P@200'].append(relevance[:200].mean())
    return {name: np.array(values) for name, values in per_query.items()}


def _envelope_ap(relevance, denominator):
    hits = np.cumsum(relevance)
    precision = hits / np.arange(1, len(relevance) + 1)
    recall = hits / denominator
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    ap, previous = 0.0, 0.0
    for i in range(len(relevance)):
        if recall[i] != previous:
            ap += (recall[i] - previous) * precision[i]
            previous = recall[i]
    return ap


def embeddings(num_queries, num_gallery, num_classes, dim=512, seed=0):
    """Class-clustered unit vectors, spread so that mAP lands mid-range like a trained model's."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g)
    query_labels = torch.randint(num_classes, (num_queries,), generator=g)
    gallery_labels = torch.arange(num_gallery) % num_classes
    queries = centres[query_labels].add_(torch.randn(num_queries, dim, generator=g), alpha=3.0)
    gallery = centres[gallery_labels].add_(torch.randn(num_gallery, dim, generator=g), alpha=3.0)
    return (torch.nn.functional.normalize(queries, dim=1), query_labels,
            torch.nn.functional.normalize(gallery, dim=1), gallery_labels)


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(kind, size, device, repeats, slow_queries):
    """One measurement (run in its own process): median seconds, extra peak memory and values."""
    q, ql, g, gl = embeddings(*SIZES[size])
    if kind == 'ours':
        q, ql, g, gl = (t.to(device) for t in (q, ql, g, gl))
        retrieval_metrics(q[:8], ql[:8], g, gl)  # load kernels before measuring
        if device == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base, times = _peak_rss_mb(), []
        for _ in range(repeats):
            start = time.perf_counter()
            result = retrieval_metrics(q, ql, g, gl, per_query=True)
            if device == 'cuda':
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        memory = torch.cuda.max_memory_allocated() / 2 ** 20 if device == 'cuda' else _peak_rss_mb() - base
        per_query = {name: result[name][:slow_queries].tolist() for name in MAIN}
        return dict(seconds=statistics.median(times), memory_mb=memory, means={n: result[n].mean().item() for n in MAIN},
                    per_query=per_query)
    start = time.perf_counter()
    result = seed_style_metrics(q[:slow_queries].double().numpy(), ql[:slow_queries].numpy(),
                                g.double().numpy(), gl.numpy())
    seconds = (time.perf_counter() - start) * len(q) / slow_queries
    return dict(seconds=seconds, per_query={name: values.tolist() for name, values in result.items()})


def run_child(kind, size, device, repeats, slow_queries):
    out = subprocess.run([sys.executable, __file__, '_measure', kind, size, device, str(repeats), str(slow_queries)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_metrics(args):
    devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    sizes = ['quick'] if args.quick else ['sketchy', 'tuberlin']
    print(f'machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch '
          f'{torch.__version__}' + (f', {torch.cuda.get_device_name()}' if torch.cuda.is_available() else ''))
    print(f'seed style measured on {args.slow_queries} queries and scaled to all of them; diffs compare '
          f'the two on those queries (float32 embeddings: ours ranks by float32 cosine, SciPy by float64)\n')
    print('| size (queries x gallery) | device | ours (s) | ours peak extra memory (MB) | seed style (s) | '
          'speed-up | diff of means | max per-query diff |')
    print('|---|---|---|---|---|---|---|---|')
    for size in sizes:
        slow = run_child('seed', size, 'cpu', 1, args.slow_queries)
        for device in devices:
            ours = run_child('ours', size, device, args.repeats, args.slow_queries)
            worst = max(abs(a - b) for name in MAIN for a, b in zip(ours['per_query'][name], slow['per_query'][name]))
            means = max(abs(np.mean(ours['per_query'][name]) - np.mean(slow['per_query'][name])) for name in MAIN)
            q, g, _ = SIZES[size]
            print(f'| {size} ({q} x {g}) | {device} | {ours["seconds"]:.3f} | {ours["memory_mb"]:.0f} | '
                  f'{slow["seconds"]:.1f} | {slow["seconds"] / ours["seconds"]:.0f}x | {means:.1e} | {worst:.1e} |')
        print(f'  {size} means (ours): ' + ', '.join(f'{n} {v:.4f}' for n, v in ours['means'].items()))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == '_measure':
        kind, size, device, repeats, slow_queries = argv[1:]
        print(json.dumps(measure(kind, size, device, int(repeats), int(slow_queries))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    metrics = commands.add_parser('metrics', help='retrieval metric speed and memory')
    metrics.add_argument('--quick', action='store_true', help='small sizes only (seconds)')
    metrics.add_argument('--repeats', type=int, default=3, help='timed runs of ours (median reported)')
    metrics.add_argument('--slow_queries', type=int, default=200, help='queries for the seed-style timing')
    args = parser.parse_args(argv)
    if args.command == 'metrics':
        bench_metrics(args)


if __name__ == '__main__':
    main()
