"""Train ACNet or MSEdge for zero-shot sketch-based image retrieval, evaluating every epoch.

    python train.py --data_name sketchy                        # ACNet, ResNet50, 512-d (seed defaults)
    python train.py --method msedge --data_name tuberlin       # MSEdge
    python train.py --data_name synthetic --no_pretrained --img_size 64 --epochs 5 --lr 1e-4  # CPU, offline

After every epoch the val (unseen-class) sketches are ranked against the val photos and the metrics
go into {save_root}/{data_name}_{method}_{backbone_type}_{emb_dim}_results.csv. Next to it:
  _model.pth    the best epoch by 'precise': every state dict, the arguments, the epoch, the metrics
  _vectors.pth  that epoch's val embeddings with their image paths, labels and domains
"""
import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from model import METHODS, EDGE_MODES, build_model, compile_model
from utils import (CHECKPOINT_FORMAT, PHOTO, SKETCH, RESIZE, METRIC_NAMES, VECTORS_FORMAT, CachedImages, DataError,
                   EpochSampler, FileImages, SketchPhotoPairs, SplitDataset, UserError, describe_split, hold_out,
                   retrieval_metrics, save_torch, scan_split, seed_everything, train_transform, write_csv)
CSV_METRICS = ('P@100', 'P@200', 'mAP@200', 'mAP@all', 'precise')
DEFAULT_WARMUP = {'acnet': 1, 'msedge': 2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--method', default='acnet', choices=list(METHODS))
    p.add_argument('--data_root', default='data', help='datasets root path')
    p.add_argument('--data_name', default='sketchy',
                   help='sketchy, tuberlin, synthetic, or any dataset folder under data_root (tuberlin* folders '
                        'get the TU-Berlin val rule)')
    p.add_argument('--backbone_type', default='resnet50', choices=['resnet50', 'vgg16'])
    p.add_argument('--emb_dim', '--proj_dim', dest='emb_dim', type=int, default=512, help='embedding dim')
    p.add_argument('--batch_size', type=int, default=64,
                   help='images per mini-batch (ACNet: batch_size // 2 sketch-photo pairs)')
    p.add_argument('--epochs', type=int, default=10)
    p.add_argument('--warmup', type=int, default=None,
                   help='epochs with a frozen backbone (default: 1 for acnet, 2 for msedge)')
    p.add_argument('--save_root', default='result', help='where results and checkpoints go')
    p.add_argument('--lr', type=float, default=1e-5, help='learning rate of the backbone and embedding layer')
    p.add_argument('--edge_mode', default='both', choices=EDGE_MODES,
                   help='msedge: which domains are fed as edge maps')
    p.add_argument('--select_on', default='test', choices=list(SELECT_KEY),
                   help='pick the best epoch on the unseen test classes (the seeds\' way, to reproduce their '
                        'tables) or on held-out images of the seen classes (no test-set selection)')
    p.add_argument('--heldout_fraction', type=float, default=0.1,
                   help='with --select_on heldout: share of every seen class\'s sketches and photos held out')
    p.add_argument('--img_size', type=int, default=224, help='input images are resized to this square')
    p.add_argument('--seed', type=int, default=1)
    p.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1), help='data loader processes')
    p.add_argument('--eval_batch_size', type=int, default=None, help='default: 2 x batch_size')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    speed = p.add_argument_group('speed (results stay the same up to float tolerance, except --amp)')
    speed.add_argument('--amp', action='store_true', help='bfloat16 autocast for the forward passes')
    speed.add_argument('--channels_last', action='store_true', help='NHWC memory format (faster convs on GPU)')
    speed.add_argument('--compile', action='store_true', help='torch.compile the networks')
    speed.add_argument('--deterministic', action='store_true',
                       help='deterministic cuDNN algorithms instead of cudnn.benchmark autotuning')
    speed.add_argument('--cache', action='store_true',
                       help='read images from `prepare.py cache` arrays instead of decoding files')
    weights = p.add_mutually_exclusive_group()
    weights.add_argument('--weights', default=None,
                         help='local ImageNet weights for the backbone (torchvision or timm format)')
    weights.add_argument('--no_pretrained', action='store_true', help='random initialisation (tests, offline)')
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = DEFAULT_WARMUP[args.method]
    if args.eval_batch_size is None:
        args.eval_batch_size = 2 * args.batch_size
    return args


def check_args(args):
    """Reject nonsense before any work starts."""
    problems = []
    if args.batch_size < (2 if args.method == 'acnet' else 1):
        problems.append(f'--batch_size must be at least {2 if args.method == "acnet" else 1} '
                        f'(ACNet batches hold batch_size // 2 sketch-photo pairs), got {args.batch_size}')
    for name in ('emb_dim', 'epochs', 'eval_batch_size'):
        if getattr(args, name) < 1:
            problems.append(f'--{name} must be at least 1, got {getattr(args, name)}')
    if not 0 <= args.warmup <= args.epochs:
        problems.append(f'--warmup must be between 0 and --epochs ({args.epochs}), got {args.warmup}')
    if args.img_size < 32 or args.img_size % 4:
        problems.append(f'--img_size must be a multiple of 4 and at least 32, got {args.img_size}')
    if args.workers < 0 or not args.lr > 0:
        problems.append('--workers must be >= 0 and --lr > 0')
    if not 0 < args.heldout_fraction < 1:
        problems.append(f'--heldout_fraction must be between 0 and 1, got {args.heldout_fraction}')
    if problems:
        raise UserError('; '.join(problems))


def run_prefix(args):
    return f'{args.data_name}_{args.method}_{args.backbone_type}_{args.emb_dim}'


# ----------------------------------------------------------------------------------------------
# Data

def load_splits(args):
    data_dir = Path(args.data_root) / args.data_name
    if args.data_name == 'synthetic' and not data_dir.exists():
        from prepare import make_synthetic
        print(f'{data_dir} not found: generating the synthetic dataset (python prepare.py synthetic)')
        make_synthetic(args.data_root)
    train_split, val_split = scan_split(args.data_root, args.data_name, 'train'), \
        scan_split(args.data_root, args.data_name, 'val')
    print(describe_split(train_split, 'train (seen classes)'))
    print(describe_split(val_split, 'val (unseen classes)'))
    return train_split, val_split


def _loader_options(args):
    return dict(num_workers=args.workers, pin_memory=args.device.startswith('cuda'), persistent_workers=args.workers > 0)


def split_images(args, split, split_name):
    """Where a split's uint8 images come from: decoded files, or the pre-resized cache."""
    if getattr(args, 'cache', False):
        return CachedImages(args.data_root, args.data_name, split_name, split, args.img_size, args.method)
    return FileImages(split.root, split.paths, args.img_size, RESIZE[args.method])


def make_train_loader(args, split):
    """ACNet: batch_size // 2 sketch-photo pairs per batch; MSEdge: batch_size single images."""
    images = split_images(args, split, 'train')
    if args.method == 'acnet':
        dataset, batch = SketchPhotoPairs(split, images, train_transform('acnet')), args.batch_size // 2
    else:
        dataset, batch = SplitDataset(split, images, train_transform('msedge')), args.batch_size
    return DataLoader(dataset, batch, sampler=EpochSampler(len(dataset), args.seed), **_loader_options(args))


def make_eval_loader(args, split, split_name='val'):
    """Every image of the split, in split order, resized as the method's evaluation transform does."""
    dataset = SplitDataset(split, split_images(args, split, split_name))
    return DataLoader(dataset, args.eval_batch_size, sampler=EpochSampler(len(dataset), 0, shuffle=False),
                      **_loader_options(args))


# ----------------------------------------------------------------------------------------------
# One training step per method. Each returns its losses as detached tensors (no host sync).

def training_nets(model, amp=False):
    """The callables a training step uses, and the autocast context for its forward passes."""
    device_type = next(model.parameters()).device.type
    nets = SimpleNamespace(raw=model, autocast=lambda: torch.autocast(device_type, torch.bfloat16, enabled=amp))
    if model.method == 'acnet':
        nets.__dict__.update(generator=model.generator, discriminator=model.discriminator,
                             extractor=model.extractor, class_loss=model.class_loss)
    else:
        nets.model = model
    return nets


def to_device(batch, device, channels_last=False):
    """Non-blocking copies; image batches (4-d) optionally in channels_last."""
    layout = torch.channels_last if channels_last else torch.preserve_format
    return [b.to(device, non_blocking=True, memory_format=layout) if b.ndim == 4 else b.to(device, non_blocking=True)
            for b in batch]


def acnet_step(nets, optimizers, batch):
    sketch, photo, labels = batch
    n = len(sketch)
    sketch, photo = nets.raw.to_input(sketch), nets.raw.to_input(photo)
    # Generator and extractor: adversarial + 0.1 * identity + 10 * class.
    discriminator = nets.raw.discriminator
    discriminator.requires_grad_(False)  # this loss trains G only; D gets its own step below
    with nets.autocast():
        generated = nets.generator(torch.cat([sketch, photo]))  # one call covers G(sketch) and G(photo)
        fake, reconstructed = generated[:n], generated[n:]
        fake_score = discriminator(fake).float()
        embeddings = nets.extractor(torch.cat([sketch, photo, fake]))
    discriminator.requires_grad_(True)
    adversarial = F.mse_loss(fake_score, torch.ones_like(fake_score))
    identity = F.l1_loss(reconstructed.float(), photo)
    # One call on the three equal parts = the mean of the three per-part losses (mean reduction).
    class_loss = nets.class_loss(embeddings.float(), labels.repeat(3))
    total = adversarial + 0.1 * identity + 10 * class_loss
    for name in ('generator', 'extractor'):
        optimizers[name].zero_grad(set_to_none=True)
    total.backward()
    for name in ('generator', 'extractor'):
        optimizers[name].step()
    # Discriminator: least squares, real photos -> 1, generated images -> 0.
    with nets.autocast():
        scores = nets.discriminator(torch.cat([photo, fake.detach().to(photo.dtype)])).float()
    real_score, fake_score = scores[:n], scores[n:]
    dis_loss = (F.mse_loss(real_score, torch.ones_like(real_score)) +
                F.mse_loss(fake_score, torch.zeros_like(fake_score))) / 2
    optimizers['discriminator'].zero_grad(set_to_none=True)
    dis_loss.backward()
    optimizers['discriminator'].step()
    return {'adv_loss': adversarial.detach(), 'identity_loss': identity.detach(),
            'class_loss': class_loss.detach(), 'dis_loss': dis_loss.detach()}


def msedge_step(nets, optimizers, batch):
    images, labels, domains, _ = batch
    with nets.autocast():
        embeddings, _ = nets.model(images, domains)
    loss = nets.raw.proxy_loss(embeddings.float(), labels)
    optimizers['model'].zero_grad(set_to_none=True)
    loss.backward()
    optimizers['model'].step()
    return {'proxy_loss': loss.detach()}


STEPS = {'acnet': acnet_step, 'msedge': msedge_step}


def train_epoch(nets, optimizers, loader, step, device, desc, channels_last=False, log_every=10):
    """One pass over the loader; returns the mean of each loss."""
    nets.raw.train()
    sums, steps = {}, 0
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None)
    for batch in bar:
        batch = to_device(batch, device, channels_last)
        for name, value in step(nets, optimizers, batch).items():
            sums[name] = sums.get(name, 0) + value
        steps += 1
        if steps % log_every == 0:  # the only host sync: every few steps, for the progress bar
            bar.set_postfix({name: f'{value.item() / steps:.3f}' for name, value in sums.items()})
    if not steps:
        raise DataError('the training loader produced no batch')
    return {name: value.item() / steps for name, value in sums.items()}


# ----------------------------------------------------------------------------------------------
# Evaluation

@torch.inference_mode()
def embed_split(model, loader, device, desc='embed val', amp=False, channels_last=False):
    """Embeddings of every item of the loader's split, in split order (row i = split item i)."""
    model.eval()
    chunks, order = [], []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None):
        images, _, domains, index = to_device(batch, device, channels_last)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            chunks.append(model.embed(images, domains).float())
        order.append(index)
    vectors, order = torch.cat(chunks), torch.cat(order)
    return torch.empty_like(vectors).index_copy_(0, order, vectors)


def split_metrics(vectors, split):
    """Unseen-class metrics: every sketch of the split queries all its photos."""
    labels = torch.tensor(split.labels, device=vectors.device)
    domains = torch.tensor(split.domains, device=vectors.device)
    sketch, photo = domains == SKETCH, domains == PHOTO
    return retrieval_metrics(vectors[sketch], labels[sketch], vectors[photo], labels[photo])


def vectors_record(vectors, split, args, epoch):
    """The embeddings with what identifies each row: its image path, label and domain."""
    return {'format': VECTORS_FORMAT, 'method': args.method, 'data_name': args.data_name,
            'data_root': str(args.data_root), 'split': 'val', 'epoch': epoch, 'classes': list(split.classes),
            'paths': list(split.paths), 'labels': torch.tensor(split.labels), 'domains': torch.tensor(split.domains),
            'vectors': vectors.cpu()}


def checkpoint_record(model, args, epoch, metrics, train_classes, prefix):
    return {'format': CHECKPOINT_FORMAT, 'method': args.method, 'args': vars(args), 'epoch': epoch,
            'metrics': metrics, 'train_classes': list(train_classes), 'model': model.state_dict(),
            'vectors_file': f'{prefix}_vectors.pth'}


def format_losses(losses):
    return ' '.join(f'{name.removesuffix("_loss")} {value:.4f}' for name, value in losses.items())


def format_metrics(metrics):
    return ' '.join(f'{name} {metrics[name]:.4f}' for name in (*METRIC_NAMES, 'precise'))


# ----------------------------------------------------------------------------------------------

SELECT_KEY = {'test': 'precise', 'heldout': 'heldout_precise'}
SELECT_TEXT = {'test': 'the unseen test classes (as the seeds do)', 'heldout': 'held-out seen-class images'}


def configure_backends(args):
    torch.backends.cudnn.benchmark = not args.deterministic
    if args.deterministic:
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def prepare_model(args, num_classes, device):
    model = build_model(args.method, num_classes, args.backbone_type, args.emb_dim, args.edge_mode,
                        pretrained=not args.no_pretrained, weights=args.weights).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizers = model.make_optimizers(args.lr, fused=True if device.type == 'cuda' else None)
    if args.compile:
        compile_model(model)
    return model, optimizers


def evaluate(model, evals, device, fast):
    """Metrics on the unseen val classes (and, when selecting on them, the held-out seen-class
    images, as heldout_*), plus the val embeddings."""
    vectors = embed_split(model, evals['val'].loader, device, **fast)
    metrics = split_metrics(vectors, evals['val'].split)
    if 'heldout' in evals:
        heldout = split_metrics(embed_split(model, evals['heldout'].loader, device, 'embed held-out', **fast),
                                evals['heldout'].split)
        metrics.update({f'heldout_{name}': value for name, value in heldout.items()})
    return metrics, vectors


def results_row(epoch, losses, metrics, select_on):
    heldout = [f'heldout_{name}' for name in CSV_METRICS if f'heldout_{name}' in metrics]
    return {'epoch': epoch, **losses, **{name: metrics[name] for name in (*CSV_METRICS, *heldout)},
            'select_on': select_on}


def train(args):
    check_args(args)
    seed_everything(args.seed)
    configure_backends(args)
    device = torch.device(args.device)
    train_split, val_split = load_splits(args)
    evals = {}
    if args.select_on == 'heldout':
        train_split, heldout_split = hold_out(train_split, args.heldout_fraction, args.seed)
        print(describe_split(heldout_split, 'held out (seen classes, for model selection)'))
        evals['heldout'] = SimpleNamespace(split=heldout_split, loader=make_eval_loader(args, heldout_split, 'train'))
    evals['val'] = SimpleNamespace(split=val_split, loader=make_eval_loader(args, val_split, 'val'))
    train_loader = make_train_loader(args, train_split)
    model, optimizers = prepare_model(args, len(train_split.classes), device)
    nets, step, fast = training_nets(model, args.amp), STEPS[args.method], dict(amp=args.amp,
                                                                                   channels_last=args.channels_last)
    save_root, prefix = Path(args.save_root), run_prefix(args)
    save_root.mkdir(parents=True, exist_ok=True)
    key = SELECT_KEY[args.select_on]

    vectors = embed_split(model, evals['val'].loader, device, 'embed val (untrained)', **fast)
    print(f'untrained   | unseen {format_metrics(split_metrics(vectors, val_split))}')
    rows, best = [], None
    for epoch in range(1, args.epochs + 1):
        start = time.time()
        model.set_warmup(epoch <= args.warmup)
        train_loader.sampler.set_epoch(epoch)
        losses = train_epoch(nets, optimizers, train_loader, step, device, f'epoch {epoch}/{args.epochs}',
                             args.channels_last)
        metrics, vectors = evaluate(model, evals, device, fast)
        rows.append(results_row(epoch, losses, metrics, args.select_on))
        improved = best is None or metrics[key] > best[key]
        if improved:
            best = {'epoch': epoch, **metrics}
            save_torch(vectors_record(vectors, val_split, args, epoch), save_root / f'{prefix}_vectors.pth')
            save_torch(checkpoint_record(model, args, epoch, metrics, train_split.classes, prefix),
                       save_root / f'{prefix}_model.pth')
        write_csv(rows, save_root / f'{prefix}_results.csv')
        heldout = f' | held-out precise {metrics["heldout_precise"]:.4f}' if 'heldout' in evals else ''
        print(f'epoch {epoch:>2}/{args.epochs} | {format_losses(losses)} | unseen {format_metrics(metrics)}{heldout} | '
              f'{time.time() - start:.0f}s{" *best" if improved else ""}')
    print(f'best epoch {best["epoch"]}, selected on {SELECT_TEXT[args.select_on]}: unseen {format_metrics(best)}')
    print(f'saved {save_root / prefix}_{{results.csv,model.pth,vectors.pth}}')
    return best


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except UserError as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
