"""Train ACNet or MSEdge for zero-shot sketch-based image retrieval, evaluating every epoch.

    python train.py --data_name sketchy                        # ACNet, ResNet50, 512-d (seed defaults)
    python train.py --method msedge --data_name tuberlin       # MSEdge
    python train.py --data_name synthetic --no_pretrained --img_size 32 --epochs 15 --lr 1e-3  # CPU, offline
    python train.py --data_name sketchy --epochs 20 --resume   # continue an interrupted (or finished) run
    torchrun --nproc_per_node 4 train.py --data_name sketchy --amp --channels_last --cache   # 4 GPUs

After every epoch the val (unseen-class) sketches are ranked against the val photos. Files in
--save_root, named {data_name}_{method}_{backbone_type}_{emb_dim}_*:
  _results.csv  one row per epoch: losses and metrics
  _model.pth    the best epoch: every state dict, the arguments, the epoch, the metrics
  _vectors.pth  that epoch's val embeddings with their image paths, labels and domains
  _last.pth     the latest epoch with optimiser states, for --resume
All are written atomically; Ctrl-C or a crash leaves the last complete epoch intact.
"""
import argparse
import os
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from model import EDGE_MODES, METHODS, backbone_tag, build_model, compile_model
from utils import (CHECKPOINT_FORMAT, METRIC_NAMES, PHOTO, RESIZE, SELECT_KEY, SKETCH, VECTORS_FORMAT, ArgumentParser,
                   CachedImages,
                   DataError, EpochSampler, FileImages, SketchPhotoPairs, SplitDataset, UserError, acquire_lock,
                   check_device, check_writable_dir, csv_writer, describe_split, drop_unreadable, fingerprint_changes,
                   hold_out, load_torch, one_line, remove_stale_temporaries, retrieval_metrics, save_together,
                   scan_split, seed_everything, split_fingerprint, train_transform)

CSV_METRICS = ('P@100', 'P@200', 'mAP@200', 'mAP@all', 'precise')
DEFAULT_WARMUP = {'acnet': 1, 'msedge': 2}
SELECT_TEXT = {'test': 'the unseen test classes (as the seeds do)', 'heldout': 'held-out seen-class images'}
# Options that define a run's results: --resume refuses to continue a run under different ones.
RUN_DEFINING = ('method', 'data_name', 'backbone_type', 'emb_dim', 'batch_size', 'warmup', 'lr', 'edge_mode',
                'img_size', 'seed', 'select_on', 'heldout_fraction', 'skip_bad_images', 'loss_weights', 'class_on',
                'eval_queries')
# ACNet's loss: adversarial + 0.1 * identity + 10 * class, the class loss on E(sketch), E(photo), E(G(sketch)).
DEFAULT_LOSS_WEIGHTS, CLASS_INPUTS = (1.0, 0.1, 10.0), ('sketch', 'photo', 'fake')


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--method', default='acnet', choices=list(METHODS))
    p.add_argument('--data_root', default='data', help='datasets root path')
    p.add_argument('--data_name', default='sketchy',
                   help='sketchy, tuberlin, synthetic, or any dataset folder under data_root (tuberlin* folders '
                        'get the TU-Berlin val rule)')
    p.add_argument('--backbone_type', default='resnet50',
                   help="resnet50 or vgg16 with each method's original ImageNet weights, or any timm name "
                        'with an optional pretrained tag (e.g. resnet50.a1_in1k)')
    p.add_argument('--emb_dim', '--proj_dim', dest='emb_dim', type=int, default=512, help='embedding dim')
    p.add_argument('--batch_size', type=int, default=64,
                   help='images per step and process (ACNet: batch_size // 2 sketch-photo pairs)')
    p.add_argument('--epochs', type=int, default=10)
    p.add_argument('--warmup', type=int, default=None,
                   help='epochs with a frozen backbone (default: 1 for acnet, 2 for msedge)')
    p.add_argument('--save_root', default='result', help='where results and checkpoints go')
    p.add_argument('--lr', type=float, default=1e-5, help='learning rate of the backbone and embedding layer')
    p.add_argument('--edge_mode', default='both', choices=EDGE_MODES,
                   help='msedge: which domains are fed as edge maps')
    p.add_argument('--loss_weights', type=float, nargs=3, default=list(DEFAULT_LOSS_WEIGHTS),
                   metavar=('ADV', 'IDENTITY', 'CLASS'),
                   help='acnet: weights of the adversarial, identity and class losses (identity 0: not computed)')
    p.add_argument('--class_on', nargs='+', default=list(CLASS_INPUTS), choices=CLASS_INPUTS,
                   help='acnet: the embeddings the class loss sees (fake: of the generated images)')
    p.add_argument('--select_on', default='test', choices=list(SELECT_KEY),
                   help="pick the best epoch on the unseen test classes (the seeds' way, to reproduce their "
                        'tables) or on held-out images of the seen classes (no test-set selection)')
    p.add_argument('--heldout_fraction', type=float, default=0.1,
                   help="with --select_on heldout: share of every seen class's sketches and photos held out")
    p.add_argument('--img_size', type=int, default=224, help='input images are resized to this square')
    p.add_argument('--seed', type=int, default=1)
    p.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1), help='data loader processes')
    p.add_argument('--eval_batch_size', type=int, default=None, help='default: 2 x batch_size')
    p.add_argument('--eval_queries', type=int, default=0,
                   help='evaluate each epoch on this many val sketches (a fixed, seeded sample; all photos stay in '
                        'the gallery), then the selected epoch on all of them; 0: all, every epoch')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    run = p.add_argument_group('runs')
    run.add_argument('--resume', action='store_true', help='continue from the _last.pth in --save_root')
    run.add_argument('--overwrite', action='store_true', help='start again, replacing an earlier run\'s files')
    run.add_argument('--skip_bad_images', action='store_true',
                     help='decode every image once first; leave out (and list) those that fail')
    speed = p.add_argument_group('speed (results stay the same up to float tolerance, except --amp)')
    speed.add_argument('--amp', action='store_true', help='bfloat16 autocast for the forward passes')
    speed.add_argument('--channels_last', action='store_true', help='NHWC memory format (faster convs on GPU)')
    speed.add_argument('--compile', action='store_true', help='torch.compile the networks')
    speed.add_argument('--deterministic', action='store_true',
                       help='deterministic cuDNN algorithms instead of cudnn.benchmark autotuning')
    speed.add_argument('--cache', action='store_true',
                       help='read images from `prepare.py cache` arrays instead of decoding files')
    speed.add_argument('--grad_checkpointing', action='store_true',
                       help="timm's gradient checkpointing in the backbone: less memory for large backbones, "
                            'about a third more compute')
    weights = p.add_mutually_exclusive_group()
    weights.add_argument('--weights', default=None,
                         help='local ImageNet weights for the backbone (torchvision or timm format)')
    weights.add_argument('--no_pretrained', action='store_true', help='random initialisation (tests, offline)')
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = DEFAULT_WARMUP[args.method]
    if args.eval_batch_size is None:
        args.eval_batch_size = 2 * args.batch_size
    args.class_on = [name for name in CLASS_INPUTS if name in args.class_on]  # one order: one file name
    return args


def check_args(args):
    """Reject nonsense before any work starts."""
    problems = []
    if args.batch_size < (2 if args.method == 'acnet' else 1):
        problems.append(f'--batch_size must be at least {2 if args.method == "acnet" else 1} '
                        f'(ACNet batches hold batch_size // 2 sketch-photo pairs), got {args.batch_size}')
    if args.eval_queries < 0:
        problems.append(f'--eval_queries must be at least 0 (0: all), got {args.eval_queries}')
    for name in ('emb_dim', 'epochs', 'eval_batch_size'):
        if getattr(args, name) < 1:
            problems.append(f'--{name} must be at least 1, got {getattr(args, name)}')
    if not 0 <= args.warmup <= args.epochs:
        problems.append(f'--warmup must be between 0 and --epochs ({args.epochs}), got {args.warmup}')
    if not 32 <= args.img_size <= 2048 or args.img_size % 4:
        problems.append(f'--img_size must be a multiple of 4 from 32 to 2048, got {args.img_size}')
    if args.workers < 0:
        problems.append(f'--workers must be at least 0, got {args.workers}')
    if not 0 < args.lr < float('inf'):
        problems.append(f'--lr must be a positive number, got {args.lr}')
    if not 0 <= args.seed < 2 ** 31:
        problems.append(f'--seed must be from 0 to 2**31 - 1, got {args.seed}')
    if not 0 < args.heldout_fraction < 1:
        problems.append(f'--heldout_fraction must be between 0 and 1, got {args.heldout_fraction}')
    if args.resume and args.overwrite:
        problems.append('--resume and --overwrite exclude each other')
    problems += [f'--{name} must not be empty' for name in ('data_root', 'save_root') if not getattr(args, name)]
    if not args.data_name or Path(args.data_name).name != args.data_name or args.data_name in ('.', '..'):
        problems.append(f'--data_name must be the name of a folder in --data_root, got {args.data_name!r}')
    if not all(0 <= w < float('inf') for w in args.loss_weights) or args.loss_weights[2] == 0:
        problems.append(f'--loss_weights must be >= 0 with a class weight above 0, got {args.loss_weights}')
    if args.method != 'acnet' and acnet_variant(args):
        problems.append('--loss_weights and --class_on apply to --method acnet only')
    if problems:
        raise UserError('; '.join(problems))
    backbone_tag(args.method, args.backbone_type)  # an unknown name fails here, naming close matches
    check_device(args.device)


def acnet_variant(args):
    """File-name suffix of a non-default ACNet loss ('' for the original), e.g. _w1-1-1_on-photo-fake."""
    suffix = ''
    if tuple(args.loss_weights) != DEFAULT_LOSS_WEIGHTS:
        suffix += '_w' + '-'.join(f'{w:g}' for w in args.loss_weights)
    if tuple(args.class_on) != CLASS_INPUTS:
        suffix += '_on-' + '-'.join(args.class_on)
    return suffix


def run_prefix(args):
    """{data_name}_{method}_{backbone_type}_{emb_dim}, plus what sets a variant apart from the original
    (ACNet loss options, MSEdge's --edge_mode), so variants never share files."""
    prefix = f'{args.data_name}_{args.method}_{args.backbone_type.replace("/", "-")}_{args.emb_dim}'
    if args.method == 'msedge':
        return prefix + ('' if args.edge_mode == 'both' else f'_edge-{args.edge_mode}')
    return prefix + acnet_variant(args)


def run_files(args):
    """The run's files in --save_root (README "Checkpoint files"), and the lock that a running run holds."""
    root, prefix = Path(args.save_root), run_prefix(args)
    files = {kind: root / f'{prefix}_{kind}.{ext}' for kind, ext in (('results', 'csv'), ('model', 'pth'),
                                                                   ('vectors', 'pth'), ('last', 'pth'),
                                                                   ('bad_images', 'txt'))}
    return SimpleNamespace(**files, lock=root / f'.{prefix}.lock')


def check_outputs(args, files):
    """--save_root must be writable, and an earlier run's files are only replaced on request. Nothing is
    created here: a run that fails before its first save leaves no folder behind."""
    check_writable_dir(args.save_root, '--save_root')
    earlier = [f for kind, f in vars(files).items() if kind != 'lock' and f.exists()]
    if args.resume and not files.last.exists():
        raise UserError(f"nothing to resume: '{files.last}' not found (same --save_root and run options?)")
    if earlier and not (args.resume or args.overwrite):
        raise UserError(f"'{earlier[0]}' exists from an earlier run: pass --resume to continue it, --overwrite "
                        f"to start again, or choose another --save_root")


def claim_outputs(args, files, rt):
    """Create --save_root and lock this run's files until the run ends; returns the release function.

    A second train.py writing the same run is refused. Temporary files of a killed save are removed.
    Releasing removes the lock, and --save_root too if this run created it and wrote nothing.
    """
    root = Path(args.save_root)
    created, release, problem = not root.exists(), None, None
    if rt.main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            release = acquire_lock(files.lock, f"run '{run_prefix(args)}' in '{root}'")
            for kind, path in vars(files).items():
                if kind != 'lock':
                    remove_stale_temporaries(path)
        except UserError as error:
            problem = error
        except OSError as error:
            problem = UserError(f"cannot write to --save_root '{root}': {error.strerror or error}")

    def release_all():
        if release:
            release()
        if created and rt.main and root.is_dir() and not any(root.iterdir()):
            root.rmdir()
    if not all_agree(problem is None, rt):
        release_all()
        raise problem or UserError('the main process could not claim the run files: see its message')
    return release_all


# ----------------------------------------------------------------------------------------------
# Distributed runs (torchrun): one process per GPU, or gloo processes on the CPU

def init_distributed(args):
    world = int(os.environ.get('WORLD_SIZE', 1))
    if world == 1:
        return SimpleNamespace(rank=0, world=1, main=True, ddp=None)
    rank, local = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', 0))
    cuda = args.device.startswith('cuda')
    if cuda:
        torch.cuda.set_device(local)
        args.device = f'cuda:{local}'
    dist.init_process_group('nccl' if cuda else 'gloo')
    return SimpleNamespace(rank=rank, world=world, main=rank == 0,
                           ddp=lambda m: DistributedDataParallel(m, device_ids=[local] if cuda else None))


def all_agree(flag, rt):
    """True when `flag` is true on every process (so that all of them stop, or none)."""
    if rt.world == 1:
        return flag
    value = torch.tensor([int(flag)], device=rt.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def reduce_mean(values, world):
    """Mean over processes of a stacked tensor (identity in a single process)."""
    if world > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= world
    return values


def gather_rows(rows, index, total, world):
    """Rows computed on every process's share of a split, assembled in split order on every process."""
    if world > 1:
        size = torch.tensor([len(rows)], device=rows.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        longest = int(max(sizes).item())
        padded_rows = torch.zeros(longest, rows.shape[1], device=rows.device, dtype=rows.dtype)
        padded_index = torch.full((longest,), -1, device=rows.device, dtype=index.dtype)
        padded_rows[:len(rows)], padded_index[:len(index)] = rows, index
        all_rows, all_index = [torch.zeros_like(padded_rows) for _ in range(world)], \
            [torch.zeros_like(padded_index) for _ in range(world)]
        dist.all_gather(all_rows, padded_rows)
        dist.all_gather(all_index, padded_index)
        rows, index = torch.cat(all_rows), torch.cat(all_index)
        rows, index = rows[index >= 0], index[index >= 0]
    return torch.zeros(total, rows.shape[1], device=rows.device, dtype=rows.dtype).index_copy_(0, index, rows)


# ----------------------------------------------------------------------------------------------
# Data

def load_splits(args, log=print):
    data_dir = Path(args.data_root) / args.data_name
    if args.data_name == 'synthetic' and not data_dir.exists():
        from prepare import make_synthetic
        log(f'{data_dir} not found: generating the synthetic dataset (python prepare.py synthetic)')
        make_synthetic(args.data_root)
    splits = [scan_split(args.data_root, args.data_name, name, keep_broken_links=args.skip_bad_images)
              for name in ('train', 'val')]
    for split, name in zip(splits, ('train (seen classes)', 'val (unseen classes)')):
        log(describe_split(split, name))
    return splits


def skip_bad_images(args, splits, files, rt, log=print):
    """With --skip_bad_images: leave out the images that fail to decode (broken links too) and list them
    in _bad_images.txt. Returns the kept splits and the left-out paths of each, relative to its folder."""
    kept, bad = zip(*(drop_unreadable(split, args.workers) for split in splits))
    bad_paths = [str(split.root / p) for split, paths in zip(splits, bad) for p in paths]
    if rt.main and bad_paths:
        save_together([(files.bad_images, lambda tmp: Path(tmp).write_text('\n'.join(bad_paths) + '\n'))])
        log(f'left out {len(bad_paths)} unreadable images (listed in {files.bad_images}), e.g. {bad_paths[0]}')
    elif rt.main:
        files.bad_images.unlink(missing_ok=True)  # an earlier run's list (--overwrite) no longer holds
    return list(kept), {'train': list(bad[0]), 'val': list(bad[1])}


def _loader_options(args):
    return dict(num_workers=args.workers, pin_memory=args.device.startswith('cuda'), persistent_workers=args.workers > 0)


def split_images(args, split, split_name):
    """Where a split's uint8 images come from: decoded files, or the pre-resized cache."""
    if getattr(args, 'cache', False):
        return CachedImages(args.data_root, args.data_name, split_name, split, args.img_size, args.method)
    return FileImages(split.root, split.paths, args.img_size, RESIZE[args.method])


def make_train_loader(args, split, rank=0, world=1):
    """ACNet: batch_size // 2 sketch-photo pairs per batch; MSEdge: batch_size single images.

    MSEdge drops a last batch of a single image: BatchNorm cannot train on one (it is a different image
    every epoch, so none is left out for good).
    """
    images = split_images(args, split, 'train')
    if args.method == 'acnet':
        dataset, batch = SketchPhotoPairs(split, images, train_transform('acnet')), args.batch_size // 2
    else:
        dataset, batch = SplitDataset(split, images, train_transform('msedge')), args.batch_size
    sampler = EpochSampler(len(dataset), args.seed, rank=rank, num_replicas=world)
    drop_last = args.method == 'msedge' and len(sampler) % batch == 1 and len(sampler) > 1
    return DataLoader(dataset, batch, sampler=sampler, drop_last=drop_last, **_loader_options(args))


def make_eval_loader(args, split, split_name='val', rank=0, world=1):
    """Every image of the split (this process's share), resized as the method's evaluation transform does."""
    dataset = SplitDataset(split, split_images(args, split, split_name))
    sampler = EpochSampler(len(dataset), 0, shuffle=False, rank=rank, num_replicas=world)
    return DataLoader(dataset, args.eval_batch_size, sampler=sampler, **_loader_options(args))


# ----------------------------------------------------------------------------------------------
# One training step per method. Each returns its losses as detached tensors (no host sync).

def training_nets(model, amp=False, ddp=None, loss_weights=DEFAULT_LOSS_WEIGHTS, class_on=CLASS_INPUTS):
    """The callables a training step uses (each trained part wrapped in DDP when distributed), the
    autocast context for its forward passes, and ACNet's loss settings."""
    device_type = next(model.parameters()).device.type
    wrap = ddp or (lambda m: m)
    nets = SimpleNamespace(raw=model, autocast=lambda: torch.autocast(device_type, torch.bfloat16, enabled=amp),
                           loss_weights=tuple(loss_weights), class_on=tuple(class_on))
    if model.method == 'acnet':
        nets.__dict__.update(generator=wrap(model.generator), discriminator=wrap(model.discriminator),
                             extractor=wrap(model.extractor), class_loss=wrap(model.class_loss))
    else:
        nets.model = wrap(model)
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
    adv_weight, identity_weight, class_weight = nets.loss_weights
    # Generator and extractor: adversarial + 0.1 * identity + 10 * class (the defaults of --loss_weights).
    discriminator = nets.raw.discriminator
    discriminator.requires_grad_(False)  # this loss trains G only; D gets its own step below
    with nets.autocast():
        # one call covers G(sketch) and, for the identity loss, G(photo): InstanceNorm is per image
        generated = nets.generator(torch.cat([sketch, photo]) if identity_weight else sketch)
        fake = generated[:n]
        fake_score = discriminator(fake).float()
        inputs = {'sketch': sketch, 'photo': photo, 'fake': fake}
        embeddings = nets.extractor(torch.cat([inputs[name] for name in nets.class_on]))
    discriminator.requires_grad_(True)
    losses = {'adv_loss': F.mse_loss(fake_score, torch.ones_like(fake_score))}
    if identity_weight:
        losses['identity_loss'] = F.l1_loss(generated[n:].float(), photo)
    # One call on equal parts = the mean of the per-part losses (mean reduction).
    losses['class_loss'] = nets.class_loss(embeddings.float(), labels.repeat(len(nets.class_on)))
    total = (adv_weight * losses['adv_loss'] + class_weight * losses['class_loss'] +
             (identity_weight * losses['identity_loss'] if identity_weight else 0))
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
    losses['dis_loss'] = dis_loss
    return {name: value.detach() for name, value in losses.items()}


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


class NonFiniteLoss(UserError):
    """A loss became NaN or infinite: training stops before anything of that epoch is saved."""


def train_epoch(nets, optimizers, loader, step, rt, desc, log_every=10):
    """One pass over the loader; returns the mean of each loss (over steps and processes).

    The host syncs only every `log_every` steps, to refresh the progress bar and to stop on a
    non-finite loss (all processes agree, so they stop together).
    """
    nets.raw.train()
    sums, steps = {}, 0
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None if rt.main else True)
    for batch in bar:
        for name, value in step(nets, optimizers, to_device(batch, rt.device, rt.channels_last)).items():
            sums[name] = sums.get(name, 0) + value
        steps += 1
        if steps % log_every == 0 or steps == len(loader):
            means = reduce_mean(torch.stack(list(sums.values())).float() / steps, rt.world).tolist()
            if not torch.isfinite(torch.tensor(means)).all():
                raise NonFiniteLoss(f'{desc}: a loss became NaN or infinite by step {steps} '
                                    f'({dict(zip(sums, means))}); lower --lr or check the data')
            bar.set_postfix({name: f'{value:.3f}' for name, value in zip(sums, means)})
    if not steps:
        raise DataError('the training loader produced no batch')
    return dict(zip(sums, means))


# ----------------------------------------------------------------------------------------------
# Evaluation

@torch.inference_mode()
def embed_split(model, loader, device, desc='embed val', amp=False, channels_last=False, world=1, show=True):
    """Embeddings of every item of the loader's split, in split order (row i = split item i)."""
    model.eval()
    chunks, order = [], []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None if show else True):
        images, _, domains, index = to_device(batch, device, channels_last)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            chunks.append(model.embed(images, domains).float())
        order.append(index)
    return gather_rows(torch.cat(chunks), torch.cat(order), len(loader.dataset), world)


def split_metrics(vectors, split):
    """Unseen-class metrics: every sketch of the split queries all its photos."""
    labels = torch.tensor(split.labels, device=vectors.device)
    domains = torch.tensor(split.domains, device=vectors.device)
    sketch, photo = domains == SKETCH, domains == PHOTO
    return retrieval_metrics(vectors[sketch], labels[sketch], vectors[photo], labels[photo])


def evaluate(model, evals, rt):
    """Metrics on the unseen val classes (and, when selecting on them, the held-out seen-class
    images, as heldout_*), plus the val embeddings."""
    embed = dict(device=rt.device, amp=rt.amp, channels_last=rt.channels_last, world=rt.world, show=rt.main)
    vectors = embed_split(model, evals['val'].loader, **embed)
    metrics = split_metrics(vectors, evals['val'].split)
    if 'heldout' in evals:
        heldout = split_metrics(embed_split(model, evals['heldout'].loader, desc='embed held-out', **embed),
                                evals['heldout'].split)
        metrics.update({f'heldout_{name}': value for name, value in heldout.items()})
    return metrics, vectors


def results_row(epoch, losses, metrics, select_on, eval_queries='all'):
    heldout = [f'heldout_{name}' for name in CSV_METRICS if f'heldout_{name}' in metrics]
    return {'epoch': epoch, **losses, **{name: metrics[name] for name in (*CSV_METRICS, *heldout)},
            'eval_queries': eval_queries, 'select_on': select_on}


def sample_queries(split, count, seed):
    """The split with every photo and a fixed, seeded sample of `count` of its sketches."""
    sketches = split.indices(SKETCH)
    chosen = set(np.random.default_rng(seed).choice(sketches, size=count, replace=False).tolist())
    return split.subset([i for i in range(len(split)) if split.domains[i] == PHOTO or i in chosen])


def evaluate_selected_epoch_fully(files, model, optimizers, args, rows, best, run, evals, full_val, rt, log):
    """With --eval_queries: the selected epoch's weights evaluated on every val sketch. Its metrics are
    appended to the results as a row with eval_queries 'all', and its files get the full val embeddings."""
    state = load_torch(files.model, CHECKPOINT_FORMAT, 'checkpoint')
    latest = (max(int(row['epoch']) for row in rows), {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(state['model'])
    metrics, vectors = evaluate(model, {**evals, 'val': full_val}, rt)
    rows.append(results_row(best['epoch'], {}, metrics, args.select_on))
    if rt.main:
        run.val_split = full_val.split
        save_epoch(files, model, optimizers, args, best['epoch'], metrics, vectors, rows, best, run, rt, latest)
    model.load_state_dict(latest[1])
    log(f'epoch {best["epoch"]:>2} on all {full_val.split.count(SKETCH)} val sketches | unseen {format_metrics(metrics)}')


def format_losses(losses):
    return ' '.join(f'{name.removesuffix("_loss")} {value:.4f}' for name, value in losses.items())


def format_metrics(metrics):
    return ' '.join(f'{name} {metrics[name]:.4f}' for name in (*METRIC_NAMES, 'precise'))


# ----------------------------------------------------------------------------------------------
# Checkpoints (format documented in README: "Checkpoint files")

def vectors_record(vectors, split, args, epoch, run_id, skipped=()):
    """The embeddings with what identifies each row (its image path, label and domain) and the run and
    epoch they belong to; `skipped`: val images --skip_bad_images left out."""
    return {'format': VECTORS_FORMAT, 'method': args.method, 'data_name': args.data_name,
            'data_root': str(args.data_root), 'split': 'val', 'epoch': epoch, 'run_id': run_id,
            'classes': list(split.classes), 'paths': list(split.paths), 'labels': torch.tensor(split.labels),
            'domains': torch.tensor(split.domains), 'skipped': list(skipped), 'vectors': vectors.cpu()}


def checkpoint_record(model, args, epoch, metrics, run):
    return {'format': CHECKPOINT_FORMAT, 'method': args.method, 'args': vars(args), 'epoch': epoch,
            'metrics': metrics, 'train_classes': list(run.train_classes), 'model': model.state_dict(),
            'backbone_tag': model.backbone_tag, 'vectors_file': f'{run.prefix}_vectors.pth', 'run_id': run.run_id,
            'data': run.data, 'skipped_images': run.skipped}


def save_epoch(files, model, optimizers, args, epoch, metrics, vectors, rows, best, run, rt, latest=None):
    """This epoch's files, written so that a failure (a full disk) changes none of them.

    _last.pth is renamed first: if the process dies before the best-epoch files follow, they lag
    behind the best epoch _last.pth names, which --resume repairs (_last.pth holds that epoch's weights).
    """
    record = checkpoint_record(model, args, epoch, metrics, run)
    last = {**record, 'rows': rows, 'best': best, 'world_size': rt.world,
            'optimizers': {name: o.state_dict() for name, o in optimizers.items()}}
    if latest is not None:  # (epoch, weights): the best epoch's files, with _last.pth at the latest epoch
        last.update(epoch=latest[0], model=latest[1])
    writes = [(files.last, lambda tmp: torch.save(last, tmp)), (files.results, csv_writer(rows))]
    if best['epoch'] == epoch:
        vectors_file = vectors_record(vectors, run.val_split, args, epoch, run.run_id, run.skipped['val'])
        writes += [(files.vectors, lambda tmp: torch.save(vectors_file, tmp)),
                   (files.model, lambda tmp: torch.save(record, tmp))]
    save_together(writes)


def resume_state(files, model, optimizers, args, rt, run):
    """Load a _last.pth into the model and optimisers after checking that the options and the data are
    the run's; returns (rows, best, next epoch) and sets run.run_id."""
    path = files.last
    last = load_torch(path, CHECKPOINT_FORMAT, 'checkpoint')
    if 'optimizers' not in last:
        raise UserError(f"'{path}' is a best-epoch checkpoint without optimiser states: resume from a _last.pth")
    # an option newer than the checkpoint counts as its default (what the run trained with)
    defaults = vars(parse_args(['--method', args.method]))
    before = {k: last['args'].get(k, defaults[k]) for k in RUN_DEFINING}
    changed = [f'--{k} {before[k]} -> {getattr(args, k)}' for k in RUN_DEFINING if before[k] != getattr(args, k)]
    if last.get('world_size', 1) != rt.world:
        changed.append(f'{last.get("world_size", 1)} -> {rt.world} processes (the effective batch size)')
    if changed:
        raise UserError(f"cannot resume '{path}' with different run options: {'; '.join(changed)}")
    differences = [f"{name} split: {'; '.join(changes)}" for name in ('train', 'val')
                   if (changes := fingerprint_changes(last['data'][name], run.data[name]))]
    if differences:
        raise UserError(f"cannot resume '{path}': the data at '{Path(args.data_root) / args.data_name}' is not the "
                        f"run's ({'; '.join(differences)}); pass the run's --data_root and --data_name")
    if last['epoch'] > args.epochs:
        raise UserError(f"'{path}' has {last['epoch']} epochs, more than --epochs {args.epochs}: pass --epochs "
                        f"{last['epoch']} or more")
    model.load_state_dict(last['model'])
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(last['optimizers'][name])
    run.run_id = last['run_id']
    return last['rows'], last['best'], last['epoch'] + 1


def best_files_lag(files, best):
    """True when _model.pth or _vectors.pth is not of the best epoch that _last.pth names (a process
    died between the renames of one save)."""
    for path, fmt in ((files.model, CHECKPOINT_FORMAT), (files.vectors, VECTORS_FORMAT)):
        try:
            if load_torch(path, fmt, 'file')['epoch'] != best['epoch']:
                return True
        except UserError:
            return True
    return False


# ----------------------------------------------------------------------------------------------

def configure_backends(args):
    torch.backends.cudnn.benchmark = not args.deterministic
    if args.deterministic:
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def prepare_model(args, num_classes, device):
    # A resumed run's weights come from its checkpoint: nothing to download.
    model = build_model(args.method, num_classes, args.backbone_type, args.emb_dim, args.edge_mode,
                        pretrained=not (args.no_pretrained or args.resume),
                        weights=None if args.resume else args.weights).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    optimizers = model.make_optimizers(args.lr, fused=True if device.type == 'cuda' else None)
    if args.compile:
        compile_model(model)
    return model, optimizers


def train(args):
    check_args(args)
    files = run_files(args)
    rt = init_distributed(args)
    rt.device, rt.amp, rt.channels_last = torch.device(args.device), args.amp, args.channels_last
    log = print if rt.main else (lambda *a, **k: None)
    check_outputs(args, files)  # on every process: all of them stop, or none
    seed_everything(args.seed)
    configure_backends(args)
    splits = load_splits(args, log)
    release = claim_outputs(args, files, rt)
    try:
        return fit(args, files, rt, log, *splits)
    finally:
        release()


def fit(args, files, rt, log, train_split, val_split):
    """Train and evaluate epoch after epoch, saving each; returns the best epoch's metrics."""
    skipped = {'train': [], 'val': []}
    if args.skip_bad_images:
        (train_split, val_split), skipped = skip_bad_images(args, (train_split, val_split), files, rt, log)
    evals = {}
    if args.select_on == 'heldout':
        train_split, heldout_split = hold_out(train_split, args.heldout_fraction, args.seed)
        log(describe_split(heldout_split, 'held out (seen classes, for model selection)'))
        evals['heldout'] = SimpleNamespace(split=heldout_split, loader=make_eval_loader(
            args, heldout_split, 'train', rt.rank, rt.world))
    full_val = SimpleNamespace(split=val_split, loader=make_eval_loader(args, val_split, 'val', rt.rank, rt.world))
    evals['val'], sampled = full_val, 0 < args.eval_queries < val_split.count(SKETCH)
    if sampled:
        part = sample_queries(val_split, args.eval_queries, args.seed)
        evals['val'] = SimpleNamespace(split=part, loader=make_eval_loader(args, part, 'val', rt.rank, rt.world))
        log(f'each epoch: {args.eval_queries} of the {val_split.count(SKETCH)} val sketches (seed {args.seed}) against '
            f'all {val_split.count(PHOTO)} photos; the selected epoch: all of them')
    train_loader = make_train_loader(args, train_split, rt.rank, rt.world)
    run = SimpleNamespace(prefix=run_prefix(args), run_id=uuid.uuid4().hex, train_classes=train_split.classes,
                          val_split=evals['val'].split, skipped=skipped,
                          data={'train': split_fingerprint(train_split), 'val': split_fingerprint(val_split)})
    model, optimizers = prepare_model(args, len(train_split.classes), rt.device)
    source = ('the resumed checkpoint' if args.resume else 'random init' if args.no_pretrained else
              args.weights or 'ImageNet weights (timm, Hugging Face hub)')
    log(f'backbone {model.backbone_tag}: {source}')
    step, key = STEPS[args.method], SELECT_KEY[args.select_on]
    if rt.world > 1:
        log(f'{rt.world} processes: effective batch size {rt.world} x {args.batch_size} = {rt.world * args.batch_size}')

    if args.resume:
        rows, best, first_epoch = resume_state(files, model, optimizers, args, rt, run)
        if first_epoch <= args.epochs:  # more epochs: an earlier full evaluation no longer holds
            rows = [row for row in rows if str(row.get('eval_queries', 'all')) != 'all' or not sampled]
        if best_files_lag(files, best) and best['epoch'] == first_epoch - 1:
            # the last save was cut short between its renames: _last.pth holds the best epoch's weights
            log(f'rewriting the best-epoch files of epoch {best["epoch"]}, which the last save did not finish')
            metrics, vectors = evaluate(model, evals, rt)
            if rt.main:
                save_epoch(files, model, optimizers, args, best['epoch'], metrics, vectors, rows, best, run, rt)
        elif best_files_lag(files, best):
            log(f'note: {files.model.name} or {files.vectors.name} is missing or not of the best epoch '
                f'{best["epoch"]}; both are written again at the next better epoch')
        log(f'resuming {files.last} after epoch {first_epoch - 1} (best so far: epoch {best["epoch"]})'
            if first_epoch <= args.epochs else f'{files.last} already has all {args.epochs} epochs: nothing to do '
                                               f'(raise --epochs to train longer)')
    else:
        rows, best, first_epoch = [], None, 1
        metrics, _ = evaluate(model, {'val': evals['val']}, rt)
        log(f'untrained   | unseen {format_metrics(metrics)}')
    nets, warming_up = None, None
    for epoch in range(first_epoch, args.epochs + 1):
        start = time.time()
        if warming_up != (epoch <= args.warmup):  # DDP wrappers must see the parameters that train now
            warming_up = epoch <= args.warmup
            model.set_warmup(warming_up)
            nets = training_nets(model, args.amp, rt.ddp, args.loss_weights, args.class_on)
        train_loader.sampler.set_epoch(epoch)
        losses = train_epoch(nets, optimizers, train_loader, step, rt, f'epoch {epoch}/{args.epochs}')
        metrics, vectors = evaluate(model, evals, rt)
        rows.append(results_row(epoch, losses, metrics, args.select_on, args.eval_queries if sampled else 'all'))
        improved = best is None or metrics[key] > best[key]
        if improved:
            best = {'epoch': epoch, **metrics}
        if rt.main:
            save_epoch(files, model, optimizers, args, epoch, metrics, vectors, rows, best, run, rt)
        heldout = f' | held-out precise {metrics["heldout_precise"]:.4f}' if 'heldout' in evals else ''
        log(f'epoch {epoch:>2}/{args.epochs} | {format_losses(losses)} | unseen {format_metrics(metrics)}{heldout} | '
            f'{time.time() - start:.0f}s{" *best" if improved else ""}')
    if sampled and not any(str(row['eval_queries']) == 'all' for row in rows):
        evaluate_selected_epoch_fully(files, model, optimizers, args, rows, best, run, evals, full_val, rt, log)
        best = {**best, **rows[-1]}
    log(f'best epoch {best["epoch"]}, selected on {SELECT_TEXT[args.select_on]}: unseen {format_metrics(best)}')
    log(f'saved {Path(args.save_root) / run.prefix}_{{results.csv,model.pth,vectors.pth,last.pth}}')
    return best


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except UserError as error:
        print(f'error: {one_line(error)}', file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError as error:
        print(f'error: out of GPU memory at --batch_size {args.batch_size} (--eval_batch_size '
              f'{args.eval_batch_size}): lower them, or add --amp ({str(error).splitlines()[0][:120]})', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        last = run_files(args).last
        saved = f'the last complete epoch is in {last}: continue with --resume' if last.exists() else 'nothing saved'
        print(f'\ninterrupted: {saved}', file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
