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
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from methods import create_model, get_method
from utils import (PHOTO, SKETCH, Split, describe_split, drop_unreadable, fingerprint_changes, hold_out, metric_name,
                   scan_split, split_fingerprint)
from zs_sbir.checkpoint import CHECKPOINT_FORMAT, VECTORS_FORMAT, checkpoint_record, load_torch, vectors_record
from zs_sbir.cli import UserError, run_cli
from zs_sbir.config import SELECT_TEXT, RunFiles, check_args, parse_args, run_defining, run_files, run_prefix
from zs_sbir.evaluation import (collapsed, describe_pairs, embed_split, fine_grained_metrics, format_fine_grained,
                                format_metrics, gzs_metrics, gzs_pool, gzs_seen_items, gzs_shortfall, make_eval_loader,
                                paired_sketches, sample_queries, split_images, split_metrics)
from zs_sbir.results import results_row, selection_key
from zs_sbir.safe_files import (acquire_lock, check_outside, check_writable_dir, csv_writer, remove_stale_temporaries,
                                save_together)
from zs_sbir.seeding import configure_backends, seed_everything
from zs_sbir.synthetic import make_synthetic
from zs_sbir.training import (Dist, NonFiniteLoss, all_agree, compile_model, init_distributed, make_train_loader,
                              train_epoch, training_nets, wait_for_main)

@dataclass
class EvalSet:
    """A split that is embedded and scored after every epoch, with its loader."""
    split: Split
    loader: DataLoader


@dataclass
class Run:
    """What one training run carries from epoch to epoch."""
    args: argparse.Namespace
    files: RunFiles
    rt: Dist
    log: Callable
    model: Optional[torch.nn.Module] = None
    optimizers: dict = field(default_factory=dict)
    evals: dict = field(default_factory=dict)  # 'val' (a sample of its queries with --eval_queries), 'heldout'
    full_val: Optional[EvalSet] = None
    full_gzs: Optional[EvalSet] = None  # with --gzs: every seen item (each epoch may score a sample of them)
    gzs_pool: dict = field(default_factory=dict)  # with --gzs: its seen items against the protocol's (CSV columns)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    train_classes: list = field(default_factory=list)
    data: dict = field(default_factory=dict)  # split fingerprints: what --resume checks
    skipped: dict = field(default_factory=lambda: {'train': [], 'val': []})
    rows: list = field(default_factory=list)
    best: Optional[dict] = None

    @property
    def sampled(self):
        return self.evals['val'] is not self.full_val


# ----------------------------------------------------------------------------------------------
# The run's files: refused when they belong to an earlier run, locked while this one writes them

def check_outputs(args, files):
    """--save_root must be writable, and an earlier run's files are only replaced on request. Nothing is
    created here: a run that fails before its first save leaves no folder behind."""
    check_writable_dir(args.save_root, '--save_root')
    check_outside(args.save_root, [('the dataset', Path(args.data_root) / args.data_name)])
    earlier = [f for f in files.outputs() if f.exists()]
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
            release = acquire_lock(files.lock, f"run '{run_prefix(args)}' in '{root}'",
                                   hint='wait for it, or use another --save_root')
            check_outputs(args, files)  # again, under the lock: another run may have finished while this one waited
            for path in files.outputs():
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
# Data

def load_splits(args, log=print):
    data_dir = Path(args.data_root) / args.data_name
    if args.data_name == 'synthetic' and not data_dir.exists():
        log(f'{data_dir} not found: generating the synthetic dataset (python prepare.py synthetic)')
        make_synthetic(args.data_root, wait=600)  # another train.py may be generating it: use its dataset
    splits = [scan_split(args.data_root, args.data_name, name, keep_broken_links=args.skip_bad_images,
                         val_classes=args.val_classes) for name in ('train', 'val')]
    for split, name in zip(splits, ('train (seen classes)', 'val (unseen classes)')):
        log(describe_split(split, name))
    return splits


def skip_bad_images(args, splits, files, rt, log=print):
    """With --skip_bad_images: leave out the images that fail to decode (broken links too) and list them
    in _bad_images.txt. Returns the kept splits and the left-out paths of each, relative to its folder."""
    kept, bad = zip(*(drop_unreadable(split, args.workers) for split in splits))
    bad_paths = [str(split.root / p) for split, paths in zip(splits, bad) for p in paths]
    if rt.main and bad_paths:
        text = '\n'.join(bad_paths) + '\n'
        save_together([(files.bad_images, lambda tmp: Path(tmp).write_text(text, errors='surrogateescape'))])
        log(f'left out {len(bad_paths)} unreadable images (listed in {files.bad_images}), e.g. {bad_paths[0]}')
    elif rt.main:
        files.bad_images.unlink(missing_ok=True)  # an earlier run's list (--overwrite) no longer holds
    return list(kept), {'train': list(bad[0]), 'val': list(bad[1])}


def eval_set(args, rt, split, split_name):
    cache = (args.data_root, args.data_name, split_name, args.method) if args.cache else None
    images = split_images(split, get_method(args.method, args), args.img_size, cache)
    return EvalSet(split, make_eval_loader(split, images, args.eval_batch_size, args.workers, args.device, rt.rank,
                                           rt.world))


def prepare_data(run, train_split, val_split):
    """The run's evaluation sets (val, its query sample, the held-out seen-class images) and its train loader."""
    args, rt, log = run.args, run.rt, run.log
    if args.skip_bad_images:
        (train_split, val_split), run.skipped = skip_bad_images(args, (train_split, val_split), run.files, rt, log)
    if args.select_on == 'heldout' or args.gzs:
        train_split, heldout_split = hold_out(train_split, args.heldout_fraction, args.seed)
        log(describe_split(heldout_split, 'held out of training (seen classes, for '
                           f"{' and '.join(w for w, on in (('model selection', args.select_on == 'heldout'), ('GZS', args.gzs)) if on)})"))
        if args.select_on == 'heldout':
            run.evals['heldout'] = eval_set(args, rt, heldout_split, 'train')
        if args.gzs:
            seen = gzs_seen_items(heldout_split, val_split, args.seed)
            run.full_gzs = run.evals['gzs'] = eval_set(args, rt, seen, 'train')
            run.gzs_pool = gzs_pool(seen, val_split)
            log(f'GZS: {seen.count(SKETCH)} seen sketches and {seen.count(PHOTO)} seen photos join the unseen '
                f'test set{gzs_shortfall(seen, val_split)}')
    if args.fine_grained:  # before any training: a dataset without pairs is one line
        log(describe_pairs(val_split))
    run.full_val = run.evals['val'] = eval_set(args, rt, val_split, 'val')
    if 0 < args.eval_queries < val_split.count(SKETCH):
        run.evals['val'] = eval_set(args, rt, sample_queries(val_split, args.eval_queries, args.seed), 'val')
        if args.fine_grained:
            paired_sketches(run.evals['val'].split,
                            f'--fine_grained with --eval_queries {args.eval_queries} (a sample without pairs: raise it)')
        log(f'each epoch: {args.eval_queries} of the {val_split.count(SKETCH)} val sketches (seed {args.seed}) against '
            f'all {val_split.count(PHOTO)} photos; the selected epoch: all of them')
        if args.gzs and run.full_gzs.split.count(SKETCH):  # the seen queries in the proportion of the unseen ones
            seen = run.full_gzs.split
            count = max(1, round(seen.count(SKETCH) * args.eval_queries / val_split.count(SKETCH)))
            run.evals['gzs'] = eval_set(args, rt, sample_queries(seen, count, args.seed), 'train')
            log(f'each epoch, GZS: {count} of the {seen.count(SKETCH)} seen sketches')
    run.train_classes = train_split.classes
    run.data = {'train': split_fingerprint(train_split), 'val': split_fingerprint(val_split)}
    cache = (args.data_root, args.data_name, 'train', args.method) if args.cache else None
    method = get_method(args.method, args)
    images = split_images(train_split, method, args.img_size, cache)
    return make_train_loader(method, train_split, images, args.batch_size, args.seed, args.workers, args.device,
                             rt.rank, rt.world)


# ----------------------------------------------------------------------------------------------
# Evaluation after every epoch

def evaluate(run, evals=None):
    """Metrics on the unseen val classes (and, when selecting on them, the held-out seen-class
    images, as heldout_*), plus the val embeddings."""
    evals, rt, args = evals or run.evals, run.rt, run.args
    embed = dict(device=rt.device, amp=args.amp, channels_last=args.channels_last, world=rt.world, show=rt.main)
    vectors = embed_split(run.model, evals['val'].loader, **embed)
    metrics = split_metrics(vectors, evals['val'].split)
    if args.fine_grained:
        metrics.update(fine_grained_metrics(vectors, evals['val'].split))
    if 'heldout' in evals:
        heldout = split_metrics(embed_split(run.model, evals['heldout'].loader, desc='embed held-out', **embed),
                                evals['heldout'].split)
        metrics.update({f'heldout_{name}': value for name, value in heldout.items()})
    if 'gzs' in evals:
        seen = embed_split(run.model, evals['gzs'].loader, desc='embed GZS seen', **embed)
        gzs = gzs_metrics(vectors, evals['val'].split, seen, evals['gzs'].split)
        metrics.update({f'gzs_{name}': value for name, value in gzs.items()}, **run.gzs_pool)
    return metrics, vectors


def evaluate_selected_epoch_fully(run):
    """With --eval_queries: the selected epoch's weights evaluated on every val sketch. Its metrics are
    appended to the results as a row with eval_queries 'all', and its files get the full val embeddings."""
    model, best = run.model, run.best
    wait_for_main(run.rt)  # the main process has written the selected epoch's file
    state = load_torch(run.files.model, CHECKPOINT_FORMAT, 'checkpoint')
    latest = (max(int(row['epoch']) for row in run.rows), {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(state['model'])
    metrics, vectors = evaluate(run, {**run.evals, 'val': run.full_val,
                                      **({'gzs': run.full_gzs} if run.full_gzs else {})})
    run.rows.append(results_row(best['epoch'], {}, metrics, run.args))
    if run.rt.main:
        save_epoch(run, best['epoch'], metrics, vectors, run.full_val.split, latest)
    model.load_state_dict(latest[1])
    run.log(f'epoch {best["epoch"]:>2} on all {run.full_val.split.count(SKETCH)} val sketches | unseen '
            f'{format_metrics(metrics, run.args.metric_convention)}')


def format_losses(losses):
    return ' '.join(f'{name.removesuffix("_loss")} {value:.4f}' for name, value in losses.items())


# ----------------------------------------------------------------------------------------------
# Checkpoints (format: docs/runs.md)

def save_epoch(run, epoch, metrics, vectors, val_split, latest=None):
    """This epoch's files, written so that a failure (a full disk) changes none of them; `vectors` are the
    embeddings of `val_split`.

    _last.pth is renamed first: if the process dies before the best-epoch files follow, they lag
    behind the best epoch _last.pth names, which --resume repairs (_last.pth holds that epoch's weights).
    """
    args, files = run.args, run.files
    record = checkpoint_record(run.model, args, epoch, metrics, run.train_classes, run.run_id,
                               f'{run_prefix(args)}_vectors.pth', run.data, run.skipped)
    last = {**record, 'rows': run.rows, 'best': run.best, 'world_size': run.rt.world,
            'optimizers': {name: o.state_dict() for name, o in run.optimizers.items()}}
    if latest is not None:  # (epoch, weights): the best epoch's files, with _last.pth at the latest epoch
        last.update(epoch=latest[0], model=latest[1])
    writes = [(files.last, lambda tmp: torch.save(last, tmp)), (files.results, csv_writer(run.rows))]
    if run.best['epoch'] == epoch:
        vectors_file = vectors_record(vectors, val_split, args.method, args.data_root, args.data_name, epoch,
                                      run.run_id, run.skipped['val'])
        writes += [(files.vectors, lambda tmp: torch.save(vectors_file, tmp)),
                   (files.model, lambda tmp: torch.save(record, tmp))]
    save_together(writes)


def resume_state(run):
    """Load a _last.pth into the model and optimisers after checking that the options and the data are
    the run's; sets the run's rows, best epoch and id, and returns the next epoch."""
    args, path = run.args, run.files.last
    last = load_torch(path, CHECKPOINT_FORMAT, 'checkpoint')
    if 'optimizers' not in last:
        raise UserError(f"'{path}' is a best-epoch checkpoint without optimiser states: resume from a _last.pth")
    # an option newer than the checkpoint counts as its default (what the run trained with)
    defaults = vars(parse_args(['--method', args.method]))
    defining = run_defining()
    before = {k: last['args'].get(k, defaults[k]) for k in defining}
    changed = [f'--{k} {before[k]} -> {getattr(args, k)}' for k in defining if before[k] != getattr(args, k)]
    if last.get('world_size', 1) != run.rt.world:
        changed.append(f'{last.get("world_size", 1)} -> {run.rt.world} processes (the effective batch size)')
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
    run.model.load_state_dict(last['model'])
    for name, optimizer in run.optimizers.items():
        optimizer.load_state_dict(last['optimizers'][name])
    run.run_id, run.rows, run.best = last['run_id'], last['rows'], last['best']
    return last['epoch'] + 1


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


def resume(run):
    """Continue a run from its _last.pth (repairing best-epoch files a killed save left behind); returns the
    first epoch still to train."""
    first_epoch = resume_state(run)
    args, best, log = run.args, run.best, run.log
    if first_epoch <= args.epochs and run.sampled:  # more epochs: an earlier full evaluation no longer holds
        run.rows = [row for row in run.rows if str(row.get('eval_queries', 'all')) != 'all']
    if best_files_lag(run.files, best) and best['epoch'] == first_epoch - 1:
        # the last save was cut short between its renames: _last.pth holds the best epoch's weights
        log(f'rewriting the best-epoch files of epoch {best["epoch"]}, which the last save did not finish')
        metrics, vectors = evaluate(run)
        if run.rt.main:
            save_epoch(run, best['epoch'], metrics, vectors, run.evals['val'].split)
    elif best_files_lag(run.files, best):
        log(f'note: {run.files.model.name} or {run.files.vectors.name} is missing or not of the best epoch '
            f'{best["epoch"]}; both are written again at the next better epoch')
    log(f'resuming {run.files.last} after epoch {first_epoch - 1} (best so far: epoch {best["epoch"]})'
        if first_epoch <= args.epochs else f'{run.files.last} already has all {args.epochs} epochs: nothing to do '
                                           f'(raise --epochs to train longer)')
    return first_epoch


# ----------------------------------------------------------------------------------------------

def prepare_model(args, train_classes, device):
    # A resumed run's weights come from its checkpoint: nothing to download.
    model = create_model(args.method, train_classes, args, pretrained=not (args.no_pretrained or args.resume),
                         weights=None if args.resume else args.weights).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    optimizers = model.make_optimizers(args, fused=True if device.type == 'cuda' else None)
    if args.compile:
        compile_model(model)
    return model, optimizers


def train(args):
    check_args(args)
    files = run_files(args)
    rt = init_distributed(args.device)
    args.device = str(rt.device)
    run = Run(args, files, rt, print if rt.main else (lambda *a, **k: None))
    check_outputs(args, files)  # on every process: all of them stop, or none
    seed_everything(args.seed)
    configure_backends(args.deterministic)
    splits = load_splits(args, run.log)
    release = claim_outputs(args, files, rt)
    try:
        return fit(run, *splits)
    finally:
        release()


def fit(run, train_split, val_split):
    """Train and evaluate epoch after epoch, saving each; returns the best epoch's metrics."""
    args, rt, log = run.args, run.rt, run.log
    train_loader = prepare_data(run, train_split, val_split)
    run.model, run.optimizers = prepare_model(args, run.train_classes, rt.device)
    source = ('the resumed checkpoint' if args.resume else 'random init' if args.no_pretrained else
              args.weights or 'ImageNet weights (timm, Hugging Face hub)')
    log(f'backbone {run.model.backbone_tag}: {source}')
    key = selection_key(args.select_on, args.metric_convention)
    if rt.world > 1:
        log(f'{rt.world} processes: effective batch size {rt.world} x {args.batch_size} = {rt.world * args.batch_size}')

    if args.resume:
        first_epoch = resume(run)
    else:
        first_epoch = 1
        metrics, _ = evaluate(run, {'val': run.evals['val']})
        log(f'untrained   | unseen {format_metrics(metrics, args.metric_convention)}'
            + (f' | fine-grained {format_fine_grained(metrics)}' if args.fine_grained else ''))
    nets, warming_up = None, None
    for epoch in range(first_epoch, args.epochs + 1):
        start = time.time()
        if warming_up != (epoch <= args.warmup):  # DDP wrappers must see the parameters that train now
            warming_up = epoch <= args.warmup
            run.model.set_warmup(warming_up)
            nets = training_nets(run.model, args.amp, rt.ddp)
        train_loader.sampler.set_epoch(epoch)
        losses = train_epoch(nets, run.optimizers, train_loader, rt, f'epoch {epoch}/{args.epochs}',
                             channels_last=args.channels_last)
        metrics, vectors = evaluate(run)
        if collapsed(vectors):  # its metrics would only rank ties: not an epoch to keep
            raise NonFiniteLoss(f'epoch {epoch}/{args.epochs}: every val embedding is the same vector (the network '
                                f'collapsed); lower --lr')
        run.rows.append(results_row(epoch, losses, metrics, args, args.eval_queries if run.sampled else 'all'))
        improved = run.best is None or metrics[key] > run.best[key]
        if improved:
            run.best = {'epoch': epoch, **metrics}
        if rt.main:
            save_epoch(run, epoch, metrics, vectors, run.evals['val'].split)
        precise = metric_name('precise', args.metric_convention)
        heldout = f' | held-out precise {metrics["heldout_" + precise]:.4f}' if 'heldout' in run.evals else ''
        heldout += f' | GZS precise {metrics["gzs_" + precise]:.4f}' if 'gzs' in run.evals else ''
        heldout += f' | fine-grained {format_fine_grained(metrics)}' if args.fine_grained else ''
        log(f'epoch {epoch:>2}/{args.epochs} | {format_losses(losses)} | unseen '
            f'{format_metrics(metrics, args.metric_convention)}{heldout} | '
            f'{time.time() - start:.0f}s{" *best" if improved else ""}')
    if run.sampled and not any(str(row['eval_queries']) == 'all' for row in run.rows):
        evaluate_selected_epoch_fully(run)
        run.best = {**run.best, **run.rows[-1]}
    log(f'best epoch {run.best["epoch"]}, selected on {SELECT_TEXT[args.select_on]}: unseen '
        f'{format_metrics(run.best, args.metric_convention)}'
        + (f' | fine-grained {format_fine_grained(run.best)}' if args.fine_grained else ''))
    log(f'saved {Path(args.save_root) / run_prefix(args)}_{{results.csv,model.pth,vectors.pth,last.pth}}')
    return run.best


def main(argv=None):
    args = parse_args(argv, __doc__)

    def interrupted():
        last = run_files(args).last
        return f'the last complete epoch is in {last}: continue with --resume' if last.exists() else 'nothing saved'
    try:
        return run_cli(train, args, interrupted)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
