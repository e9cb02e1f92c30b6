"""Speed and memory benchmarks that print figures, never pass/fail (formerly bench.py; docs/speed.md).

    python speed.py metrics                 # retrieval metrics at Sketchy, TU-Berlin and QuickDraw size, CPU (+GPU)
    python speed.py metrics --quick         # small sizes, seconds
    python speed.py metrics --devices cuda  # ours on the GPU only (ours on the CPU takes minutes at QuickDraw size)
    python speed.py train                   # training/evaluation throughput, seed settings vs ours (GPU)
    python speed.py train --quick           # tiny sizes on the CPU, about a minute
    python speed.py train --compile --methods acnet --backbones resnet50   # one row, torch.compile in 'ours'
    python speed.py backbones               # images/s and peak memory per backbone, +- gradient checkpointing
    python speed.py backbones --quick       # tiny backbones at 64 px on the CPU
    python speed.py search                  # search.py: index build images/s; query latency at 10k-1M photos
    python speed.py search --quick          # 10k and 20k vectors, seconds
    python speed.py runtimes                # embedding photos/s: torch (eager, channels_last, bf16) vs ONNX Runtime, CPU
    python speed.py runtimes --quick        # 64 px, 16 photos: seconds

`train` measures, for acnet and msedge x resnet50 and vgg16, training and evaluation images/s twice in
the same run: with "seed settings" (fp32, deterministic cuDNN, NCHW, no compile, .item() after every
step, images decoded from files) and with "ours" (bf16 autocast and fused Adam on GPU, channels_last,
cudnn.benchmark, optional compile, no per-step host sync, the prepare.py cache). "memory" columns feed
in-memory tensors (model-bound); "loader" columns use the real DataLoader on a generated dataset at the
benchmark's image size (input-bound).

`metrics` times utils.retrieval_metrics against a per-query implementation in the seeds' style
(SciPy cosine distances, one NumPy argsort per query, the precision envelope in a Python loop over
ranks) on the same embeddings, in the same run. The slow one runs on a subsample of the queries and
is scaled up to all of them. Each measurement runs in a fresh process so its peak memory is its own.
"""
import argparse
import copy
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from methods import create_model, get_method, method_names, with_defaults
from utils import METRIC_NAMES, PHOTO, SKETCH, Split, retrieval_metrics, scan_split
from zs_sbir.cli import (DEFAULT_WORKERS, ArgumentParser, Limit, UserError, check_device, check_numbers, default_device,
                         run_cli)
from zs_sbir.datasets import EpochSampler
from zs_sbir.evaluation import make_eval_loader, split_images, to_device
from zs_sbir.image_cache import build_cache
from zs_sbir.reference_metrics import reference_metrics
from zs_sbir.retrieval import Gallery, embed
from zs_sbir.search_index import build_faiss, embed_as, photo_batches, tune
from zs_sbir.synthetic import make_synthetic
from zs_sbir.training import compile_model, make_train_loader, training_nets

# (queries, gallery, classes): the zero-shot test sets the seeds evaluate on
SIZES = {'sketchy': (12694, 12553, 21), 'tuberlin': (2400, 27989, 30), 'quickdraw': (92291, 54151, 30),
         'quick': (1500, 2000, 10)}


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
        per_query = {name: result[name][:slow_queries].tolist() for name in METRIC_NAMES}
        return dict(seconds=statistics.median(times), memory_mb=memory, means={n: result[n].mean().item() for n in METRIC_NAMES},
                    per_query=per_query)
    start = time.perf_counter()
    result = reference_metrics(q[:slow_queries].double().numpy(), ql[:slow_queries].numpy(),
                               g.double().numpy(), gl.numpy(), scipy_cosine=True)
    seconds = (time.perf_counter() - start) * len(q) / slow_queries
    return dict(seconds=seconds, per_query={name: result[name].tolist() for name in METRIC_NAMES})


def run_child(kind, size, device, repeats, slow_queries):
    out = subprocess.run([sys.executable, __file__, '_measure', kind, size, device, str(repeats), str(slow_queries)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_metrics(args):
    check_numbers(args)
    devices = [check_device(d, '--devices').type for d in args.devices] if args.devices else \
        ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    sizes = args.sizes
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
            worst = max(abs(a - b) for name in METRIC_NAMES for a, b in zip(ours['per_query'][name], slow['per_query'][name]))
            means = max(abs(np.mean(ours['per_query'][name]) - np.mean(slow['per_query'][name])) for name in METRIC_NAMES)
            q, g, _ = SIZES[size]
            print(f'| {size} ({q} x {g}) | {device} | {ours["seconds"]:.3f} | {ours["memory_mb"]:.0f} | '
                  f'{slow["seconds"]:.1f} | {slow["seconds"] / ours["seconds"]:.0f}x | {means:.1e} | {worst:.1e} |')
        print(f'  {size} means (ours): ' + ', '.join(f'{n} {v:.4f}' for n, v in ours['means'].items()))


# ----------------------------------------------------------------------------------------------
# Training and evaluation throughput

def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def settings(name, device, compile_ours):
    cuda = device.type == 'cuda'
    if name == 'seed':
        return dict(amp=False, channels_last=False, compile=False, deterministic=True, sync_every_step=True,
                    cache=False, fused=False)
    return dict(amp=cuda, channels_last=cuda, compile=compile_ours, deterministic=False, sync_every_step=False,
                cache=True, fused=cuda)  # channels_last and bf16 pay off on GPUs, not on CPUs


def prepared_model(method, backbone, classes, device, s, img_size):
    torch.backends.cudnn.benchmark = not s['deterministic']
    torch.backends.cudnn.deterministic = s['deterministic']
    torch.manual_seed(0)
    options = with_defaults(method, dict(backbone_type=backbone, emb_dim=512, lr=1e-5, img_size=img_size))
    model = create_model(method, classes, options, pretrained=False).to(device)
    if s['channels_last']:
        model.to(memory_format=torch.channels_last)
    optimizers = model.make_optimizers(options, fused=True if s['fused'] else None)
    if not s['fused']:  # the seeds' torch 1.x Adam: one parameter at a time
        for optimizer in optimizers.values():
            optimizer.defaults['foreach'] = False
            for group in optimizer.param_groups:
                group['foreach'] = False
    if s['compile']:
        compile_model(model)
    return model, optimizers


def time_training(model, optimizers, batches, device, s, warmup=2):
    """Images/s of training steps over an iterable of CPU batches (every image of a pair or triplet counts)."""
    nets = training_nets(model, s['amp'])
    model.set_warmup(False)
    model.train()
    count, start = 0, None
    for i, batch in enumerate(batches):
        if i == warmup:
            _sync(device)
            start, count = time.perf_counter(), 0
        losses = model.training_step(nets, optimizers, to_device(batch, device, s['channels_last']))
        if s['sync_every_step']:
            [value.item() for value in losses.values()]
        count += sum(len(part) for part in batch if part.ndim == 4)
    _sync(device)
    return count / (time.perf_counter() - start)


def time_embedding(model, batches, device, s, warmup=1):
    """Images/s of embedding (inference mode, autocast for ours) over an iterable of CPU batches."""
    model.eval()
    count, start = 0, None
    with torch.inference_mode():
        for i, batch in enumerate(batches):
            if i == warmup:
                _sync(device)
                start, count = time.perf_counter(), 0
            images, _, domains, _ = to_device(batch, device, s['channels_last'])
            embed(model, images, domains, s['amp'])
            count += len(images)
    _sync(device)
    return count / (time.perf_counter() - start)


def memory_batches(method, batch_size, size, num_classes, count):
    """`count` copies of one training batch (as the method's train_dataset makes it) and of one evaluation batch,
    of random images held in memory: what the model alone costs."""
    g = torch.Generator().manual_seed(0)
    n = 2 * max(batch_size, 2 * num_classes)  # every class with sketches and photos, and a full batch
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels, domains = torch.arange(n) % num_classes, (torch.arange(n) // num_classes) % 2
    split = Split(Path('.'), [str(c) for c in range(num_classes)], [str(i) for i in range(n)], labels.tolist(),
                  domains.tolist())
    dataset, per_batch, _ = get_method(method).train_dataset(split, list(images), batch_size)
    train = next(iter(torch.utils.data.DataLoader(dataset, per_batch, sampler=EpochSampler(len(dataset), 0))))
    evaluation = [images[:batch_size], labels[:batch_size], domains[:batch_size], torch.arange(batch_size)]
    return [train] * count, [evaluation] * count


@contextmanager
def scratch_folder(prefix):
    """A temporary folder, removed however the benchmark ends (Ctrl-C too)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bench_train(args):
    device = check_device(args.device)
    check_numbers(args, batch_size=Limit(2, 65536))  # an ACNet batch holds pairs
    pairs = method_backbones(args.methods, args.backbones, ['resnet50', 'vgg16'])  # one line for an unknown name
    if args.quick and not args.backbones:  # each method's first backbone only
        pairs = [pair for i, pair in enumerate(pairs) if pair[0] not in [m for m, _ in pairs[:i]]]
    with scratch_folder('bench-data-') as root:
        measure_train(args, device, pairs, root)


def measure_train(args, device, pairs, root):
    print(f'generating a {args.img_size}-px synthetic dataset in {root} ...')
    make_synthetic(root, num_classes=12, num_val_classes=4, num_sketches=args.batch_size, num_photos=args.batch_size,
                   num_val_photos=args.batch_size, img_size=args.img_size, workers=max(1, args.workers))
    train_split, val_split = scan_split(root, 'synthetic', 'train'), scan_split(root, 'synthetic', 'val')
    for method in args.methods:
        build_cache(root, 'synthetic', args.img_size, get_method(method).interpolation, workers=args.workers)
    name = torch.cuda.get_device_name() if device.type == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'
    print(f'\ndevice: {name}; torch {torch.__version__}; image {args.img_size} px, batch {args.batch_size}, '
          f'{args.steps} timed steps, {args.workers} loader workers; images/s (higher is better)\n')
    print('| method | backbone | setting | train, memory | eval, memory | train, loader | eval, loader |')
    print('|---|---|---|---|---|---|---|')
    val_rates = {}
    for method, backbone in pairs:
        results = {}
        for setting in args.settings:
            s = settings(setting, device, args.compile)
            model, optimizers = prepared_model(method, backbone, train_split.classes, device, s, args.img_size)
            train_mem, eval_mem = memory_batches(method, args.batch_size, args.img_size,
                                                 len(train_split.classes), args.steps + 2)
            images = {name: split_images(split, model, args.img_size, (root, 'synthetic', name, method) if s['cache']
                                         else None)
                      for name, split in (('train', train_split), ('val', val_split))}
            train_loader = make_train_loader(model, train_split, images['train'], args.batch_size, 1, args.workers,
                                             device.type)
            eval_loader = make_eval_loader(val_split, images['val'], 2 * args.batch_size, args.workers, device.type)
            row = [time_training(model, optimizers, train_mem, device, s),
                   time_embedding(model, eval_mem, device, s),
                   time_training(model, optimizers, islice(_forever(train_loader), args.steps + 2), device, s),
                   time_embedding(model, islice(_forever(eval_loader), args.steps + 1), device, s)]
            results[setting] = row
            print(f'| {method} | {backbone} | {setting} | ' + ' | '.join(f'{v:.0f}' for v in row) + ' |')
            del model, optimizers, train_loader, eval_loader
        if len(results) == 2:
            ratios = [o / b for o, b in zip(results['ours'], results['seed'])]
            print(f'| {method} | {backbone} | **ratio** | ' + ' | '.join(f'**{r:.2f}x**' for r in ratios) + ' |')
        last = args.settings[-1]
        val_rates[f'{method} {backbone} {last}'] = results[last][3]
    sketchy_val = sum(SIZES['sketchy'][:2])
    print(f'\na Sketchy-size val set ({sketchy_val:,} images) embedded through the loader, at the last setting\'s rates '
          'above: ' + ', '.join(f'{name} {sketchy_val / rate:.0f} s' for name, rate in val_rates.items()))
    q, ql, g, gl = (t.to(device) for t in embeddings(*SIZES['sketchy']))
    retrieval_metrics(q[:8], ql[:8], g, gl)
    _sync(device)
    start = time.perf_counter()
    retrieval_metrics(q, ql, g, gl)
    _sync(device)
    print(f'\nmetrics at Sketchy size (12694 x 12553, 512-d) on {device.type}: {time.perf_counter() - start:.2f} s '
          f'(`python speed.py metrics` compares with the seeds\' per-query style)')


# ----------------------------------------------------------------------------------------------
# Backbones: training speed and peak memory, with and without gradient checkpointing

BACKBONES = ['resnet50', 'vgg16', 'convnext_tiny', 'vit_small_patch14_dinov2', 'vit_base_patch16_clip_224']
QUICK_BACKBONES = ['resnet18', 'convnext_atto', 'vit_tiny_patch16_224']


def measure_backbone(method, backbone, img_size, batch_size, steps, checkpointing, device):
    """One measurement (run in its own process): train images/s, peak memory, parameters, feature sizes."""
    device = torch.device(device)
    s = settings('ours', device, compile_ours=False)
    model, optimizers = prepared_model(method, backbone, [str(c) for c in range(10)], device, s, img_size)
    if checkpointing:
        model.set_grad_checkpointing()
    train_batches, _ = memory_batches(method, batch_size, img_size, 10, steps + 2)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    base = _peak_rss_mb()
    speed = time_training(model, optimizers, train_batches, device, s)
    memory = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == 'cuda' else _peak_rss_mb() - base
    backbone_net = model.backbone_module()
    info = getattr(backbone_net, 'feature_info', None)  # a features_only model's levels, else one pooled feature
    features = info.channels() if hasattr(info, 'channels') else \
        [getattr(backbone_net, 'num_features', None) or getattr(backbone_net, 'output_dim', None)]
    return dict(images_per_s=speed, memory_mb=memory, features=features,
                params_m=sum(p.numel() for p in backbone_net.parameters()) / 1e6, tag=model.backbone_tag)


def method_backbones(methods, asked, candidates):
    """[(method, backbone)] to measure: `asked` (every name refused by every method is one line), else of
    `candidates` those each method takes, else the method's own default."""
    if asked:
        for backbone in asked:
            if not any(get_method(method).takes_backbone(backbone) for method in methods):
                get_method(methods[0]).check_backbone(backbone, '--backbones')
        return [(m, b) for b in asked for m in methods if get_method(m).takes_backbone(b)]
    pairs = []
    for method in methods:
        own = [b for b in candidates if get_method(method).takes_backbone(b)] or [get_method(method).defaults['backbone_type']]
        pairs += [(method, b) for b in own]
    return pairs


def bench_backbones(args):
    device = check_device(args.device).type
    check_numbers(args, batch_size=Limit(2, 65536))
    pairs = method_backbones(args.methods, args.backbones, QUICK_BACKBONES if args.quick else BACKBONES)
    name = torch.cuda.get_device_name() if device == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'
    print(f'device: {name}; torch {torch.__version__}; random init, {args.img_size} px, batch {args.batch_size}, '
          f'{args.steps} timed steps; bf16 autocast on GPU; peak memory: {"allocated on the GPU" if device == "cuda" else "extra RSS"}\n')
    print('| backbone (tag) | params (M) | method | features | grad checkpointing | train images/s | peak memory (MB) |')
    print('|---|---|---|---|---|---|---|')
    for method, backbone in sorted(pairs, key=lambda pair: pair[1]):
        for checkpointing in (False, True):
            out = run_backbone_child(method, backbone, args.img_size, args.batch_size, args.steps, checkpointing,
                                     device)
            if out is None:
                print(f'| {backbone} | | {method} | | {"on" if checkpointing else "off"} | failed | |')
                continue
            print(f'| {backbone} ({out["tag"]}) | {out["params_m"]:.1f} | {method} | '
                  f'{"/".join(map(str, out["features"]))} | {"on" if checkpointing else "off"} | '
                  f'{out["images_per_s"]:.1f} | {out["memory_mb"]:.0f} |', flush=True)


def run_backbone_child(method, backbone, img_size, batch_size, steps, checkpointing, device):
    argv = [sys.executable, __file__, '_backbone', method, backbone, str(img_size), str(batch_size), str(steps),
            str(int(checkpointing)), device]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:  # e.g. out of memory: reported in the table, the other rows still run
        print(f'  ({method} {backbone}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode})')
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# search.py: index build throughput, query latency, index memory and recall of the approximate indexes

def clustered_unit_vectors(count, dim, clusters, seed, spread=1.0):
    """Unit vectors around `clusters` random centres; spread 1 puts same-cluster cosines near 0.5, like a
    trained model's same-class photos (uniform random vectors would have no neighbours worth finding)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g)
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, 100_000):
        n = min(100_000, count - start)
        block = centres[torch.randint(clusters, (n,), generator=g)] + spread * torch.randn(n, dim, generator=g)
        out[start:start + n] = torch.nn.functional.normalize(block, dim=1).numpy()
    return out


def embed_throughput(method, img_size, count, batch_size, workers, device):
    """Images/s of search.py's index loop (decode, resize, embed) over generated photos, a method's default backbone
    from random init."""
    with scratch_folder('bench-photos-') as root:
        return embed_rate(method, img_size, count, batch_size, workers, device, root)


def embed_rate(method, img_size, count, batch_size, workers, device, root):
    per_class = -(-count // 4)
    make_synthetic(root, num_classes=6, num_val_classes=2, num_sketches=1, num_photos=per_class,
                   num_val_photos=1, img_size=img_size, workers=max(1, workers))
    photo_dir = root / 'synthetic' / 'train' / 'photo'
    files = sorted(str(p.relative_to(photo_dir)) for p in photo_dir.rglob('*.jpg'))[:count]
    model = create_model(method, list('abcd'), dict(img_size=img_size), pretrained=False)
    model = model.to(device).eval()
    batches = photo_batches(files, photo_dir, img_size, model.interpolation, batch_size, workers, device)
    embed_as(model, next(batches)[1], PHOTO, device)  # warm-up
    _sync(torch.device(device))
    start = time.perf_counter()
    done = sum(len(embed_as(model, images, PHOTO, device)) for _, images, _ in batches)
    _sync(torch.device(device))
    return done / (time.perf_counter() - start)


def bench_search(args):
    import faiss
    check_numbers(args)
    devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    print(f'machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, '
          f'{faiss.omp_get_max_threads()} FAISS threads, faiss {faiss.__version__}, torch {torch.__version__}')
    for device in devices:
        batch = min(32, max(1, args.embed_images // 4))  # the first batch warms up: three or more are timed
        rate = embed_throughput(args.method, args.img_size, args.embed_images, batch, args.workers, device)
        print(f'index build on {device}: {rate:.1f} images/s ({args.method} '
              f'{get_method(args.method).defaults["backbone_type"]}, {args.img_size} px, decode + resize + embed, '
              f'{args.embed_images} generated photos)')
    print(f'\n{args.emb_dim}-d unit vectors in {args.clusters} clusters; {args.queries} single queries (median latency, '
          f'top 10); recall@10 against the exact top 10; ivf: nprobe 32, hnsw: M 32, efSearch 128\n')
    print('| photos | index | build (s) | index memory (MB) | query latency (ms) | recall@10 |')
    print('|---|---|---|---|---|---|')
    for size in args.sizes:
        vectors = clustered_unit_vectors(size, args.emb_dim, args.clusters, seed=size)
        queries = torch.from_numpy(clustered_unit_vectors(args.queries, args.emb_dim, args.clusters, seed=size))
        exact = torch.from_numpy(vectors)
        truth = torch.cat([(block @ exact.T).topk(10).indices for block in queries.split(20)]).tolist()
        for kind in args.approx:
            start = time.perf_counter()
            index = None if kind == 'flat' else tune(build_faiss(vectors, kind))
            build = time.perf_counter() - start
            memory = vectors.nbytes if index is None else faiss.serialize_index(index).nbytes
            gallery, times, found = Gallery(exact, range(size), [''] * size, index), [], []
            for query in queries:
                start = time.perf_counter()
                hits = gallery.top_k(query, 10)
                times.append(time.perf_counter() - start)
                found.append([hit.row for hit in hits])
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
            print(f'| {size:,} | {kind} | {build:.1f} | {memory / 2 ** 20:.0f} | {1000 * statistics.median(times):.2f} '
                  f'| {recall:.3f} |', flush=True)
            del index


def bench_runtimes(args):
    """Photos/s of each method's photo embedder on the CPU under torch (eager, channels_last, and bf16 autocast) and
    ONNX Runtime (fp32, and int8 graphs), in one run: on batches already decoded, and search.py's index loop (decode, resize, embed) as the
    build sees it; with how far ONNX's embeddings are from torch's and how many of fp32 torch's top 10 photos of each
    sketch ONNX, bf16 and int8 keep (recall@10 against fp32). Random init on generated photos, or with --data_base a
    trained checkpoint on its own val split."""
    check_numbers(args, batch_size=Limit(1, 4096), photos=Limit(1, 10 ** 6))
    methods = args.methods
    if args.data_base:  # its method, image size and val split, checked here: a bad one is one line, not a child's
        from zs_sbir.checkpoint import CHECKPOINT_FORMAT, load_torch
        checkpoint = load_torch(args.data_base, CHECKPOINT_FORMAT, 'checkpoint')
        methods, args.img_size = [checkpoint['method']], checkpoint['args']['img_size']
        val_split(checkpoint)
    source = (f'{args.data_base} on its val split (its sketches against {args.photos} of its photos, drawn across its '
              f'classes)' if args.data_base else f'{args.photos} generated photos, random init')
    print(f'CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch '
          f'{torch.__version__}, onnxruntime {_version("onnxruntime")}; {args.img_size} px, batch {args.batch_size}, '
          f'{source}; {args.repeats} passes, the runtimes taking turns batch by batch (the builds pass by pass); '
          f'medians of the photos/s and of the ratios of neighbouring timings\n')
    columns = runtime_columns()
    print('| ' + ' | '.join(name for name, _ in columns) + ' |')
    print('|' + '---|' * len(columns))
    for method in methods:  # each in a fresh process, as a command runs one: no method's state times another's
        row = run_runtime_child(method, args.img_size, args.photos, args.batch_size, args.repeats, args.workers,
                                args.data_base or '')
        if row is not None:
            print('| ' + ' | '.join(cell(row | {'method': method}) for _, cell in columns) + ' |', flush=True)
    print('\nphotos/s; recall@10: the share of the top 10 photos of each sketch under fp32 torch that the other '
          'runtime\'s embeddings keep (1.000: the same photos)')


ALTERNATIVES = {'onnx': 'ONNX', 'bf16': 'bf16', 'int8': 'int8'}  # against fp32 torch eager


def runtime_columns():
    """(header, cell of a row) of `speed.py runtimes`' table."""
    rate = lambda key: lambda row: f'{row[key]:.1f}'  # noqa: E731
    ratio = lambda key: lambda row: f'{row[key]:.2f}x'  # noqa: E731
    return [('method', lambda row: row['method']), ('backbone', lambda row: row['backbone']),
            ('torch eager', rate('eager')), ('torch channels_last', rate('channels_last')),
            ('ONNX Runtime', rate('onnx')), ('ONNX / eager', ratio('ratio_onnx')),
            ('torch bf16', rate('bf16')), ('bf16 / eager', ratio('ratio_bf16')),
            ('ONNX int8', rate('int8')), ('int8 / eager', ratio('ratio_int8')),
            ('index build: torch', rate('build_eager')),
            *[column for key, label in ALTERNATIVES.items() for column in
              ((f'index build: {label}', rate(f'build_{key}')), (f'{label} build ratio', ratio(f'build_ratio_{key}')))],
            ('ONNX max abs diff', lambda row: f"{row['diff']:.1e}"),
            *[(f'recall@10 {label}', lambda row, key=key: f"{row[f'recall_{key}']:.3f}") for key, label in
              ALTERNATIVES.items()]]


def run_runtime_child(*row_args):
    out = subprocess.run([sys.executable, __file__, '_runtime', *map(str, row_args)], capture_output=True, text=True)
    if out.returncode != 0:
        print(f'  ({row_args[0]}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode})')
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def generated_run(method, img_size, count, workers, root):
    """(checkpoint, photo folder, photo files, sketch folder, sketch files): a random-init checkpoint of `method`
    and generated images at img_size."""
    from zs_sbir.checkpoint import checkpoint_record
    from zs_sbir.config import parse_args as train_args
    from zs_sbir.safe_files import save_torch
    make_synthetic(root, num_classes=6, num_val_classes=2, num_sketches=3, num_photos=-(-count // 4),
                   num_val_photos=1, img_size=img_size, workers=max(1, workers))
    options = train_args(['--method', method, '--data_name', 'synthetic', '--img_size', str(img_size),
                          '--no_pretrained'])
    save_torch(checkpoint_record(create_model(method, list('abcd'), options, pretrained=False), options,
                                 train_classes=list('abcd')), root / 'model.pth')
    photo_dir, sketch_dir = (root / 'synthetic' / 'train' / side for side in ('photo', 'sketch'))
    return (root / 'model.pth', photo_dir, sorted(str(p.relative_to(photo_dir)) for p in photo_dir.rglob('*.jpg')),
            sketch_dir, sorted(str(p.relative_to(sketch_dir)) for p in sketch_dir.rglob('*.png')))


def checkpoint_run(checkpoint):
    """The same for a trained checkpoint: its val split's photos and sketches, as test.py --evaluate reads them."""
    from zs_sbir.checkpoint import CHECKPOINT_FORMAT, load_torch
    split = val_split(load_torch(checkpoint, CHECKPOINT_FORMAT, 'checkpoint'))
    paths = {domain: [p for p, d in zip(split.paths, split.domains) if d == domain] for domain in (PHOTO, SKETCH)}
    return Path(checkpoint), split.root, paths[PHOTO], split.root, paths[SKETCH]


def val_split(record):
    """A loaded checkpoint's val split, with its val classes (the run's, else its method's)."""
    trained = record['args']
    return scan_split(trained['data_root'], trained['data_name'], 'val', val_classes=trained.get('val_classes') or
                      get_method(record['method'], trained).defaults['val_classes'])


def runtime_row(method, img_size, count, batch_size, repeats, workers, root, checkpoint=''):
    from zs_sbir.precision import Bf16Model
    from zs_sbir.retrieval import load_model
    path, photo_dir, files, sketch_dir, sketch_files = (
        checkpoint_run(checkpoint) if checkpoint else generated_run(method, img_size, count, workers, root))
    files = files[::max(1, len(files) // count)][:count]  # every class of a val split, not only the first ones
    onnx = load_model(path, 'cpu', 'onnx', quiet=True)[0]  # as test.py and search.py load it
    model, img_size = onnx.model, onnx.img_size
    onnx.prepare()
    # int8 calibrates on the training split: the checkpoint's, or the generated one beside the photos
    int8 = load_model(path, 'cpu', 'onnx', quiet=True, precision='int8',
                      calibration=None if checkpoint else photo_dir.parent)[0]
    try:
        int8.prepare()
    except UserError as error:  # a checkpoint whose training split is not here: the other columns still count
        print(f'  ({error}: no int8 columns)', file=sys.stderr)
        int8 = None
    batches = [images for _, images, _ in photo_batches(files, photo_dir, img_size, model.interpolation, batch_size,
                                                        0, 'cpu')]
    nets = {'eager': (model, torch.contiguous_format), 'onnx': (onnx, torch.contiguous_format),
            'channels_last': (copy.deepcopy(model).to(memory_format=torch.channels_last), torch.channels_last),
            'bf16': (Bf16Model(copy.deepcopy(model)), torch.channels_last), 'int8': (int8, torch.contiguous_format)}
    nets = {name: net for name, net in nets.items() if net[0] is not None}
    alternatives = [name for name in ALTERNATIVES if name in nets]
    inputs = {name: [b.contiguous(memory_format=layout) for b in batches] for name, (_, layout) in nets.items()}
    for name, (net, _) in nets.items():
        embed_as(net, inputs[name][0], PHOTO, 'cpu')  # warm-up

    def embed_seconds(name, images):
        start = time.perf_counter()
        embed_as(nets[name][0], images, PHOTO, 'cpu')
        return time.perf_counter() - start

    def build_seconds(name):  # search.py index's loop: decode, resize, embed
        start = time.perf_counter()
        for _, images, _ in photo_batches(files, photo_dir, img_size, model.interpolation, batch_size, workers, 'cpu'):
            embed_as(nets[name][0], images, PHOTO, 'cpu')
        return time.perf_counter() - start
    # The runtimes take turns batch after batch (the build: pass after pass) and each ratio is one of neighbouring
    # timings: these machines speed up and slow down by tens of percent within minutes, which then favours none.
    seconds = {name: [] for name in nets}
    for _ in range(repeats):
        for i in range(len(batches)):
            for name in nets:
                seconds[name].append(embed_seconds(name, inputs[name][i]))
    builds = {name: [] for name in ('eager', *alternatives)}
    for _ in range(repeats):
        for name in builds:
            builds[name].append(build_seconds(name))
    sizes = [len(b) for b in batches] * repeats
    row = {'backbone': model.backbone_tag,
           **{name: statistics.median(n / t for n, t in zip(sizes, seconds[name])) for name in nets},
           **{f'ratio_{name}': statistics.median(t / o for t, o in zip(seconds['eager'], seconds[name]))
              for name in alternatives},
           **{f'build_{name}': len(files) / statistics.median(builds[name]) for name in builds},
           **{f'build_ratio_{name}': statistics.median(t / o for t, o in zip(builds['eager'], builds[name]))
              for name in alternatives}}
    sketches = torch.cat([images for _, images, _ in photo_batches(sketch_files, sketch_dir, img_size,
                                                                   model.interpolation, batch_size, 0, 'cpu')])
    photos = torch.cat(batches)
    ours = {name: (embed_as(nets[name][0], sketches, SKETCH, 'cpu'), embed_as(nets[name][0], photos, PHOTO, 'cpu'))
            for name in ('eager', *alternatives)}
    row['diff'] = max((a - b).abs().max().item() for a, b in zip(ours['eager'], ours['onnx']))
    k = min(10, len(photos))
    tops = {name: (q @ g.T).topk(k).indices.tolist() for name, (q, g) in ours.items()}
    for name in alternatives:
        row[f'recall_{name}'] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(tops['eager'], tops[name])]))
    missing = {key: float('nan') for name in ALTERNATIVES if name not in nets for key in
               (name, f'ratio_{name}', f'build_{name}', f'build_ratio_{name}', f'recall_{name}')}
    return row | missing  # (printed as nan)


def _version(package):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return 'not installed'


def _forever(loader):
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest='command', required=True)
    metrics = commands.add_parser('metrics', help='retrieval metric speed and memory')
    metrics.add_argument('--quick', action='store_true', help='small sizes only (seconds)')
    metrics.add_argument('--repeats', type=int, default=3, help='timed runs of ours (median reported)')
    metrics.add_argument('--slow_queries', type=int, default=200, help='queries for the seed-style timing')
    metrics.add_argument('--sizes', nargs='+', default=None,
                         choices=['sketchy', 'tuberlin', 'quickdraw'], help='zero-shot test-set sizes to measure')
    metrics.add_argument('--devices', nargs='+', default=None,
                         help="where ours runs (default: cpu, and cuda when there is one); the seeds' style runs on the CPU")
    train = commands.add_parser('train', help='training and evaluation throughput, seed settings vs ours',
                                renamed={'--cpu': ['--device', 'cpu']})
    train.add_argument('--quick', action='store_true', help='32 px, batch 8, 3 steps: about a minute on a CPU')
    train.add_argument('--img_size', type=int, default=None, help='default 224 (--quick: 32)')
    train.add_argument('--batch_size', type=int, default=None, help='default 64 (--quick: 8)')
    train.add_argument('--steps', type=int, default=None, help='timed steps per measurement, after warm-up (default 20, '
                                                               '--quick: 3)')
    train.add_argument('--workers', type=int, default=DEFAULT_WORKERS, help='data loader processes')
    train.add_argument('--compile', action='store_true', help="also torch.compile in 'ours'")
    train.add_argument('--methods', nargs='+', default=method_names(), choices=method_names())
    train.add_argument('--backbones', nargs='+', default=None,
                       help="backbone names (default: resnet50 and vgg16 for the methods that take timm's models, each "
                            "other method's own)")
    train.add_argument('--settings', nargs='+', default=['seed', 'ours'], choices=['seed', 'ours'],
                       help='measure these (the ratio needs both)')
    backbones = commands.add_parser('backbones', help='train speed and peak memory per backbone, +- grad checkpointing',
                                    renamed={'--cpu': ['--device', 'cpu']})
    backbones.add_argument('--methods', nargs='+', default=method_names(), choices=method_names())
    backbones.add_argument('--backbones', nargs='+', default=None,
                           help=f'backbone names (default: {" ".join(BACKBONES)} for the methods that take timm\'s '
                                "models, each other method's own)")
    backbones.add_argument('--quick', action='store_true', help=f'{" ".join(QUICK_BACKBONES)} at 64 px, batch 8')
    backbones.add_argument('--img_size', type=int, default=None, help='default 224 (--quick: 64)')
    backbones.add_argument('--batch_size', type=int, default=None, help='default 64 (--quick: 8)')
    backbones.add_argument('--steps', type=int, default=None, help='timed steps per measurement, after warm-up '
                                                                   '(default 10, --quick: 2)')
    search = commands.add_parser('search', help='search.py: index build images/s, query latency, recall',
                                 renamed={'--kinds': '--approx', '--dim': '--emb_dim'})
    search.add_argument('--quick', action='store_true', help='10k and 20k vectors, 16 photos at 64 px: seconds')
    search.add_argument('--method', default='msedge', choices=method_names(),
                        help="whose networks (its default backbone, random init) the index build is timed with")
    search.add_argument('--sizes', type=int, nargs='+', default=None, help='gallery sizes (default 10000 100000 '
                                                                           '1000000, --quick: 10000 20000)')
    search.add_argument('--approx', nargs='+', default=['flat', 'ivf', 'hnsw'], choices=['flat', 'ivf', 'hnsw'],
                        help='flat: exact (as search.py ranks without --approx); ivf, hnsw: approximate')
    search.add_argument('--emb_dim', type=int, default=512, help='embedding size of the vectors')
    search.add_argument('--clusters', type=int, default=1000, help='clusters the vectors are drawn around')
    search.add_argument('--queries', type=int, default=200)
    search.add_argument('--embed_images', type=int, default=None, help='photos embedded for the build throughput '
                                                                       '(default 128, --quick: 16)')
    search.add_argument('--img_size', type=int, default=None, help='default 224 (--quick: 64)')
    search.add_argument('--workers', type=int, default=DEFAULT_WORKERS, help='data loader processes for the build '
                                                                              'throughput')
    runtimes = commands.add_parser('runtimes', help='embedding photos/s on the CPU: torch (fp32, bf16) vs ONNX Runtime')
    runtimes.add_argument('--quick', action='store_true', help='64 px, 16 photos, one pass: seconds')
    runtimes.add_argument('--methods', nargs='+', default=method_names(), choices=method_names())
    runtimes.add_argument('--img_size', type=int, default=None, help='default 224 (--quick: 64)')
    runtimes.add_argument('--batch_size', type=int, default=16)
    runtimes.add_argument('--photos', type=int, default=None, help='photos embedded (default 128, --quick: 16; with '
                                                                   '--data_base: of its val photos)')
    runtimes.add_argument('--repeats', type=int, default=None, help='timed passes over them (default 5, --quick: 1)')
    runtimes.add_argument('--workers', type=int, default=DEFAULT_WORKERS, help='data loader processes of the index '
                                                                              'build')
    runtimes.add_argument('--data_base', default=None, help='a trained checkpoint: measured on its val split at its '
                                                            'image size (its method; --methods and --img_size do not '
                                                            'apply), instead of random init on generated photos')
    for sub in (train, backbones):
        sub.add_argument('--device', default=default_device(), help='cpu: measure on the CPU even when a GPU is present')
    return with_sizes(p.parse_args(argv))


# Sizes of each subcommand (full, --quick); an option given on the command line wins over either.
SIZE_DEFAULTS = {
    'metrics': {'sizes': (['sketchy', 'tuberlin', 'quickdraw'], ['quick'])},
    'train': {'img_size': (224, 32), 'batch_size': (64, 8), 'steps': (20, 3)},
    'backbones': {'img_size': (224, 64), 'batch_size': (64, 8), 'steps': (10, 2)},
    'runtimes': {'img_size': (224, 64), 'photos': (128, 16), 'repeats': (5, 1)},
    'search': {'sizes': ([10_000, 100_000, 1_000_000], [10_000, 20_000]), 'embed_images': (128, 16), 'img_size': (224, 64)},
}


def with_sizes(args):
    for name, (full, quick) in SIZE_DEFAULTS[args.command].items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == '_measure':
        kind, size, device, repeats, slow_queries = argv[1:]
        print(json.dumps(measure(kind, size, device, int(repeats), int(slow_queries))))
        return
    if argv and argv[0] == '_backbone':
        method, backbone, img_size, batch_size, steps, checkpointing, device = argv[1:]
        print(json.dumps(measure_backbone(method, backbone, int(img_size), int(batch_size), int(steps),
                                          bool(int(checkpointing)), device)))
        return
    if argv and argv[0] == '_runtime':
        method, *sizes, checkpoint = argv[1:]
        with scratch_folder('bench-runtimes-') as root:
            print(json.dumps(runtime_row(method, *map(int, sizes), root, checkpoint)))
        return
    args = parse_args(argv)
    run_cli({'metrics': bench_metrics, 'train': bench_train, 'backbones': bench_backbones,
             'search': bench_search, 'runtimes': bench_runtimes}[args.command], args)


if __name__ == '__main__':
    main()
