"""Reproduce the benchmark tables (formerly benchmark.py): run a grid of train.py configurations, then build
the table.

    python reproduce.py --datasets sketchy tuberlin --dry_run          # print the commands it would run
    python reproduce.py --datasets sketchy tuberlin                    # run what is missing, print the table
    python reproduce.py --datasets synthetic --backbones resnet50 --emb_dims 64 512 -- --no_pretrained \\
        --img_size 32 --epochs 15 --lr 1e-3                            # anything after -- goes to train.py
    python reproduce.py --table_only                                   # table from the CSVs already there

A run is finished when its _last.pth holds every epoch and, after --eval_queries, its CSV ends with the
selected epoch scored on every sketch; finished runs are skipped, an interrupted one continues with
--resume, and the table is built from finished runs only. The table
has the seeds' layout (one row per method, backbone and dim; mAP@200, mAP@all, P@100, P@200 per
dataset, in percent) with the published ACNet numbers beside ours, one row per run at the epoch its
selection rule picked, and a column saying which rule that was (test: best epoch on the unseen test
classes, as the seeds did; heldout: on held-out seen-class images). It goes to stdout and
{save_root}/benchmark.md.
"""
import argparse
import re
import subprocess
import sys
from itertools import product
from pathlib import Path

import pandas as pd
import torch

from methods import get_method, method_names
from utils import CONVENTIONS, FINE_GRAINED_NAMES, METRIC_NAMES, metric_name
from zs_sbir.cli import ArgumentParser, UserError, check_numbers, first_line, run_cli
from zs_sbir.config import check_args, parse_args as train_args, run_prefix
from zs_sbir.results import GZS_POOL, SELECT_ON, read_results
from zs_sbir.safe_files import atomic_write, check_writable_dir


DATASET_TITLES = {'sketchy': 'Sketchy Extended', 'sketchy21': 'Sketchy Ext (21)', 'sketchy25': 'Sketchy Ext (25)',
                  'tuberlin': 'TU-Berlin Extended', 'quickdraw': 'QuickDraw Extended', 'synthetic': 'generated dataset'}
# The metrics papers compare on each dataset (by the start of its folder name); all four elsewhere, as the
# seeds' tables do (a plain `sketchy` folder does not say which split it is).
PAPER_METRICS = (('sketchy21', ('mAP@200', 'P@200')), ('sketchy25', ('mAP@all', 'P@100')),
                 ('tuberlin', ('mAP@all', 'P@100')), ('quickdraw', ('mAP@all', 'P@200')))
ALL_VAL_MARK = '†'  # a TU-Berlin number on every val class
SHORT_MARK = '‡'  # a GZS number with fewer seen items than the protocol's 20 %
# Other methods' published QuickDraw-Extended numbers (their papers and repos), in percent.
PUBLISHED_OTHERS = {'quickdraw': [('ZSE-SBIR', {'mAP@all': 14.5, 'P@200': 21.6}),
                                  ('SAKE', {'mAP@all': 13.0, 'P@200': 17.9}),
                                  ('Doodle2Search', {'mAP@all': 7.5, 'P@200': 6.8})]}
# What train.py's run_prefix adds after the method's own suffix: another metric convention, TU-Berlin val rule,
# selection on held-out images
COMMON_SUFFIXES = r'(?:_sake|_torchmetrics)?(?:_val-(?:all|seeds))?(?:_heldout)?'


def parse_run_name(filename):
    """(method, match with dataset, backbone, dim, variant, gzs) of a results CSV named as train.py names them,
    {data_name}_{method}_{backbone_type}_{emb_dim}{variant}[_gzs][_fg]_results.csv, or None."""
    for method in method_names():
        found = re.fullmatch(rf'(?P<dataset>.+?)_{re.escape(method)}_(?P<backbone>.+)_(?P<dim>\d+)'
                             rf'(?P<variant>{get_method(method).file_suffix_pattern}{COMMON_SUFFIXES})(?P<gzs>_gzs)?'
                             r'(?P<fg>_fg)?'
                             r'_results\.csv', filename)
        if found:
            return method, found
    return None


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--methods', nargs='+', default=method_names(), choices=method_names())
    p.add_argument('--backbones', nargs='+', default=None,
                   help="each method's backbones of its paper's table (ACNet, MSEdge: resnet50 and vgg16; ClipPrompt: "
                        'ViT-B-32), or any names: each method takes those it can build (timm\'s, open_clip\'s)')
    p.add_argument('--emb_dims', nargs='+', type=int, default=None,
                   help="each method's of its paper's table (ACNet, MSEdge: 64 512 4096); a method whose size is its "
                        "backbone's (ClipPrompt) keeps its own")
    p.add_argument('--datasets', nargs='+', default=['sketchy', 'tuberlin'], help='dataset folders under data_root')
    p.add_argument('--select_on', default='test', choices=SELECT_ON)
    p.add_argument('--metric_convention', default=None, choices=CONVENTIONS,
                   help="the tables' metrics (docs/metrics.md; default: each run's, its method's paper's); also "
                        'what the runs select their epoch on')
    p.add_argument('--save_root', default='result/benchmark', help='where the runs and the table go')
    p.add_argument('--dry_run', action='store_true', help='print the commands of unfinished runs, run nothing')
    p.add_argument('--table_only', action='store_true', help='only build the table from existing CSVs')
    p.add_argument('--ablations', action='store_true',
                   help="also every ablation of the original code's history beside each method (docs/training.md)")
    p.add_argument('--gzs', action='store_true', help='also score generalized ZS-SBIR (train.py --gzs), in its own '
                                                      'columns')
    p.add_argument('--fine_grained', action='store_true',
                   help="also score fine-grained ZS-SBIR (train.py --fine_grained: Acc@1/5/10), in its own columns")
    p.add_argument('--seeds', nargs='+', type=int, default=None,
                   help="run every configuration once per seed (train.py --seed), each seed's runs in "
                        '{save_root}/seed-{seed}, and table the mean and sample standard deviation over them')
    p.add_argument('--all_metrics', action='store_true',
                   help='all four metrics and precise (their mean) for every dataset, not only those papers '
                        'compare on it')
    p.add_argument('train_args', nargs='*', help='after --: extra train.py options for every run')
    return p.parse_args(argv)


def configurations(args):
    """[(method, backbone, emb_dim)] of the grid: each method's paper table, or the asked backbones it can build
    and the asked sizes (its own where its backbone fixes it); a backbone no method builds is one line."""
    for backbone in args.backbones or ():
        if not any(get_method(method).takes_backbone(backbone) for method in args.methods):
            get_method(args.methods[0]).check_backbone(backbone, '--backbones')
    found = []
    for method in args.methods:
        own_backbones, own_dims = get_method(method).grid()
        backbones = [b for b in args.backbones if get_method(method).takes_backbone(b)] if args.backbones \
            else own_backbones
        for backbone in backbones:
            fixed = get_method(method).fixed_emb_dim(backbone)
            dims = [fixed] if fixed else args.emb_dims or own_dims
            found += [(method, backbone, dim) for dim in dims]
    return found


def grid(args):
    """(train.py argument list, parsed train.py args) for every configuration of the grid."""
    runs = []
    for (method, backbone, dim), dataset, seed in product(configurations(args), args.datasets, args.seeds or [None]):
        ablations = [a['argv'] for a in get_method(method).ablations if backbone.startswith(a.get('backbones', ''))]
        variants = [[]] + ablations if args.ablations else [[]]
        for variant in variants:
            argv = ['--method', method, '--backbone_type', backbone, '--emb_dim', str(dim), '--data_name', dataset,
                    '--save_root', seed_folder(args.save_root, seed), '--select_on', args.select_on, *variant,
                    *(['--metric_convention', args.metric_convention] if args.metric_convention else []),
                    *(['--gzs'] if args.gzs else []), *(['--fine_grained'] if args.fine_grained else []),
                    *(['--seed', str(seed)] if seed is not None else []), *args.train_args]
            runs.append((argv, train_args(argv)))
    return runs


def seed_folder(save_root, seed):
    """Where the runs of one seed go (train.py's file names do not say the seed)."""
    return str(save_root) if seed is None else str(Path(save_root) / f'seed-{seed}')


def results_csv(run_args):
    return Path(run_args.save_root) / f'{run_prefix(run_args)}_results.csv'


def unfinished(path, epochs=None):
    """Why the run of a results CSV is not complete, in words, or None when it is: its _last.pth holds all its
    epochs (`epochs`, else those it was started for) and, when it scored a sample of the queries each epoch, its
    results end with the selected epoch scored on every sketch. A table is built from complete runs only."""
    last = Path(path).with_name(Path(path).name.replace('_results.csv', '_last.pth'))
    if not Path(path).is_file():
        return 'no results CSV'
    try:
        _, reported = read_results(path)
    except UserError as error:
        return str(error).replace(f"'{path}' is", 'it is', 1)
    if not last.is_file():
        return f'no {last.name} beside it'
    try:  # memory-mapped: only the few entries read come off the disk
        record = torch.load(last, map_location='cpu', weights_only=True, mmap=True)
        trained, epoch = record['args'], record['epoch']
        epochs = epochs or trained['epochs']
    except Exception as error:  # noqa: BLE001 (a damaged or foreign file: not a run this table can vouch for)
        return f'its {last.name} cannot be read ({first_line(error)})'
    if epoch < epochs:
        return f'it has {epoch} of {epochs} epochs'
    if str(reported.get('eval_queries', 'all')) != 'all':
        return 'its selected epoch was never scored on every sketch (--eval_queries)'
    return None


def run_grid(args):
    failed = []
    for argv, run_args in grid(args):
        if unfinished(results_csv(run_args), run_args.epochs) is None:
            print(f'done already: {results_csv(run_args)}')
            continue
        resume = ['--resume'] if (Path(run_args.save_root) / f'{run_prefix(run_args)}_last.pth').exists() else []
        command = [sys.executable, 'train.py', *argv, *resume]
        print(' '.join(command), flush=True)
        if not args.dry_run and subprocess.run(command).returncode != 0:
            failed.append(run_prefix(run_args))
    return failed


def best_rows(save_root, convention=None, paths=None):
    """One row per complete run under save_root (of `paths`, its results CSVs, when given): the epoch its
    selection rule picked, its metrics in `convention` (default: the run's own). Files that are not train.py's, and
    runs not complete, are skipped with a note."""
    rows = []
    if paths is None:  # every run there, and those of reproduce.py --seeds in its seed-* folders
        paths = [*Path(save_root).glob('*_results.csv'), *Path(save_root).glob('seed-*/*_results.csv')]
    for path in sorted(paths):
        parsed = parse_run_name(path.name)
        if parsed is None:
            print(f'skipped {path}: not named as train.py names its results')
            continue
        why = unfinished(path)
        if why:
            print(f'skipped {path}: {why}')
            continue
        method, name = parsed
        try:
            frame, best = read_results(path)
        except UserError as error:
            print(f'skipped: {error}')
            continue
        select_on = frame['select_on'].iloc[-1] if 'select_on' in frame else 'test'
        shown = convention or (frame['metric_convention'].iloc[-1] if 'metric_convention' in frame else 'sake')
        if metric_name('precise', shown) not in best:
            print(f'skipped {path}: it has no {shown} metrics (written before they were saved)')
            continue
        variant = name['variant'].replace('_', ' ').strip()
        gzs = {f'GZS {m}': 100 * float(best[f'gzs_{metric_name(m, shown)}']) for m in (*METRIC_NAMES, 'precise')
               if f'gzs_{metric_name(m, shown)}' in best}
        fine = {f'FG {m}': 100 * float(best[f'fg_{m}']) for m in FINE_GRAINED_NAMES if f'fg_{m}' in best}
        if gzs and all(pd.notna(best.get(c)) for c in GZS_POOL):  # fewer seen items than the protocol's 20 %?
            seen, wanted = [[int(best[f'gzs_{k}_{d}']) for d in ('sketches', 'photos')] for k in ('seen', 'protocol')]
            if seen[0] < wanted[0] or seen[1] < wanted[1]:
                gzs['GZS pool'] = f'{seen[0]} of {wanted[0]} sketches and {seen[1]} of {wanted[1]} photos'
        variant += ' gzs' if name['gzs'] else ''  # trained on fewer images: its own row
        variant += ' fg' if name['fg'] else ''  # the same training as the plain run: never averaged with it
        variant = variant.strip()
        rows.append({'dataset': name['dataset'], 'method': method + (f' {variant}' if variant else ''),
                     'backbone': name['backbone'], 'dim': int(name['dim']), 'epoch': int(best['epoch']),
                     'epochs': len(frame), 'select_on': select_on, 'metrics': shown,
                     'val_classes': frame['val_classes'].iloc[-1] if 'val_classes' in frame else 'seeds',
                     'seed': run_seed(path), 'path': str(path),
                     **{m: 100 * float(best[metric_name(m, shown)]) for m in (*METRIC_NAMES, 'precise')}, **gzs,
                     **fine})
    return drop_repeated_seeds(pd.DataFrame(rows))


def run_seed(results):
    """The --seed a run trained with (its _last.pth's arguments; complete runs have one)."""
    last = Path(results).with_name(Path(results).name.replace('_results.csv', '_last.pth'))
    return int(torch.load(last, map_location='cpu', weights_only=True, mmap=True)['args'].get('seed', 1))


def drop_repeated_seeds(rows):
    """One run per configuration and seed: a run in --save_root itself and one in its seed-N folder may be the
    same seed (train.py's default is 1); the later in path order (seed-N/ sorts first) is left out, with a note."""
    if rows.empty:
        return rows
    repeated = rows.duplicated(RUN_IDENTITY + ['seed'])
    for _, row in rows[repeated].iterrows():
        print(f"skipped {row['path']}: another run of the same configuration has seed {row['seed']} too")
    return rows[~repeated].drop(columns='path')


RUN_IDENTITY = ['dataset', 'method', 'backbone', 'dim', 'select_on', 'metrics', 'val_classes']


def over_seeds(rows):
    """One row per configuration: each metric's mean over its seeds' runs, its sample standard deviation (as
    '<metric> sd', NaN for one run) and n, the number of runs."""
    values = [c for c in rows if c not in RUN_IDENTITY + ['epoch', 'epochs', 'seed', 'GZS pool']]
    groups = rows.groupby(RUN_IDENTITY, sort=True, dropna=False)
    table = groups[values].mean()
    spread = groups[values].std(ddof=1)
    table[[f'{column} sd' for column in values]] = spread[values].to_numpy()
    table['n'] = groups.size()
    if 'GZS pool' in rows:  # the same for every seed: the pool depends on the data and --heldout_fraction
        table['GZS pool'] = groups['GZS pool'].first()
    return table.reset_index()


def dataset_metrics(dataset, all_metrics=False):
    """The metrics a table shows for a dataset: those papers compare, or all four and precise (the mean of the
    four, which selects the epoch)."""
    if not all_metrics:
        for prefix, metrics in PAPER_METRICS:
            if dataset.startswith(prefix):
                return metrics
        return METRIC_NAMES
    return (*METRIC_NAMES, 'precise')


def ablation_sources():
    """{row label, e.g. 'acnet extractor-triplet': where the original code had that variant} for every ablation."""
    sources = {}
    for method in method_names():
        for ablation in get_method(method).ablations:
            options = train_args(['--method', method, *ablation['argv']])
            suffix = get_method(method, options).file_suffix(options).replace('_', ' ').strip()
            sources[f'{method} {suffix}'] = f"the original's {ablation['source']}"
    return sources


def build_table(rows, all_metrics=False):
    """Markdown in the seeds' layout, with the metrics papers compare per dataset; the published ACNet
    rows next to ours where they exist, and other methods' published numbers, marked as such."""
    datasets = sorted(set(rows['dataset']), key=lambda d: (d not in DATASET_TITLES, d))
    columns = [(d, m) for d in datasets for m in dataset_metrics(d, all_metrics)]
    if any(column.startswith('GZS ') and not column.endswith(' sd') for column in rows):  # the same metrics again
        columns += [(d, f'GZS {m}') for d in datasets for m in dataset_metrics(d, all_metrics)]
    columns += [(d, f'FG {m}') for d in datasets for m in FINE_GRAINED_NAMES if f'FG {m}' in rows]
    seeds = 'n' in rows and rows['n'].max() > 1
    header = ['method', 'backbone', 'dim', 'selected on', 'metrics', *(['seeds'] if seeds else [])] + \
        [f'{DATASET_TITLES.get(d, d)} {m}' for d, m in columns]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]

    def cell(value, mark=''):
        mean, sd, short = value if isinstance(value, tuple) else (value, None, '')
        return f'{mean:.1f}{mark}{short}' + (f' ± {sd:.1f}' if sd is not None and pd.notna(sd) else '')

    def line(label, backbone, dim, selected, convention, values, all_val=(), n=None):
        cells = [cell(values[d][m], ALL_VAL_MARK if d in all_val else '') if m in values.get(d, {}) else ''
                 for d, m in columns]
        count = [str(n or '')] if seeds else []
        return f'| {label} | {backbone} | {dim} | {selected} | {convention} | ' + ' | '.join(count + cells) + ' |'
    marked = False
    shown = [m for _, m in columns]
    for (method, backbone, dim, convention), group in rows.groupby(['method', 'backbone', 'dim', 'metrics'],
                                                                    sort=True):
        ours = {row['dataset']: {m: (row[m], row.get(f'{m} sd'), SHORT_MARK if m.startswith('GZS ') and
                                     isinstance(row.get('GZS pool'), str) else '')
                                 for m in row.index if m in shown and pd.notna(row[m])}
                for _, row in group.iterrows()}
        all_val = {row['dataset'] for _, row in group.iterrows()
                   if row['dataset'].startswith('tuberlin') and row['val_classes'] == 'all'}
        counts = sorted({int(n) for n in group['n']}) if 'n' in group else []
        lines.append(line(f'{method} (ours)', backbone, dim, ', '.join(sorted(set(group['select_on']))), convention,
                          ours, all_val, '/'.join(map(str, counts))))
        marked |= bool(all_val)
        if method in method_names():  # a variant ('acnet ce') has no published row; a published row, its paper's metrics
            paper = get_method(method).defaults
            published = {d: get_method(method).published(backbone, dim, d) for d in datasets}
            all_val = {d for d in datasets if d.startswith('tuberlin') and paper['val_classes'] == 'all'}
            if any(published.values()):
                lines.append(line(f'{method} (published)', backbone, dim, 'test', paper['metric_convention'], published,
                                  all_val))
                marked |= bool(all_val)
    for dataset in datasets:
        for name, values in PUBLISHED_OTHERS.get(dataset, []):
            lines.append(line(f'{name} (published, another method)', '', '', '', 'its paper', {dataset: values}))
    short = sorted({f"{row['method']} on {DATASET_TITLES.get(row['dataset'], row['dataset'])}: {row['GZS pool']}"
                    for _, row in rows.iterrows() if isinstance(row.get('GZS pool'), str)})
    if short:
        lines.append(f"\n{SHORT_MARK} GZS with fewer seen items than the protocol's 20 % (fewer were held out of "
                     f"training): {'; '.join(short)}")
    sources = ablation_sources()
    shown_variants = sorted({(label, source) for m in rows['method'] for label, source in sources.items()
                             if m == label or m.startswith(label + ' ')})  # 'acnet extractor-triplet gzs' too
    if shown_variants:
        lines.append('\n' + '; '.join(f'{label}: {source}' for label, source in shown_variants))
    if seeds:
        lines.append('\nours: mean ± sample standard deviation over the seeds (n runs each)')
    if marked:
        lines.append(f'\n{ALL_VAL_MARK} every TU-Berlin val class kept, as ClipPrompt evaluates (--val_classes all); the '
                     f'other TU-Berlin numbers leave out the classes with fewer than 400 photos, as the seeds do')
    return '\n'.join(lines)


# train.py options the grid sets itself, and reproduce.py's own option for each
GRID_OPTIONS = {'--method': '--methods', '--backbone_type': '--backbones', '--emb_dim': '--emb_dims',
                '--proj_dim': '--emb_dims', '--data_name': '--datasets', '--select_on': '--select_on',
                '--metric_convention': '--metric_convention'}


def run(args):
    check_numbers(args)  # --emb_dims, --seeds (cli.LIMITS)
    if args.seeds and len(set(args.seeds)) < len(args.seeds):
        raise UserError(f'--seeds must differ, got {" ".join(map(str, args.seeds))}')
    if args.seeds and '--seed' in args.train_args:
        raise UserError('--seed after -- would give every run of --seeds the same seed: leave it out')
    if '--save_root' in args.train_args:
        raise UserError('--save_root after -- would send the runs elsewhere than the table reads: give '
                        'reproduce.py --save_root (before --) instead')
    grid_options = [o for o in args.train_args if o.split('=')[0] in GRID_OPTIONS]
    if grid_options:  # appended after the grid's own values, they would replace them in every run
        raise UserError(f'{grid_options[0].split("=")[0]} after -- would override the grid in every run: use '
                        f"reproduce.py's {GRID_OPTIONS[grid_options[0].split('=')[0]]} (before --) instead")
    check_writable_dir(args.save_root, '--save_root')
    if not args.table_only:
        missing = set()
        for _, run_args in grid(args):
            check_args(run_args)  # an unknown backbone, a bad option after --: one line, before any run
            folder = Path(run_args.data_root) / run_args.data_name
            if run_args.data_name != 'synthetic' and not folder.is_dir():  # train.py generates synthetic itself
                if not args.dry_run:
                    raise UserError(f"--datasets {run_args.data_name}: no dataset folder '{folder}' (set train.py's "
                                    f"--data_root after --)")
                missing.add(str(folder))
        for folder in sorted(missing):  # a dry run prints the commands whatever data is there
            print(f"note: no dataset folder '{folder}' yet (docs/data.md says how to make it)")
    failed = [] if args.table_only else run_grid(args)
    if args.dry_run:
        return
    # the grid's own runs, or with --table_only every run under --save_root: complete ones only
    rows = best_rows(args.save_root, args.metric_convention,
                     None if args.table_only else [results_csv(run_args) for _, run_args in grid(args)])
    if rows.empty:
        raise UserError(f"no complete run of train.py under '{args.save_root}' (run the grid first, or pass the "
                        f"--save_root that holds them)")
    table = build_table(over_seeds(rows), args.all_metrics)
    print(table)
    atomic_write(Path(args.save_root, 'benchmark.md'), lambda tmp: Path(tmp).write_text(table + '\n'))
    if failed:
        print(f'error: {len(failed)} runs failed: {", ".join(failed)}', file=sys.stderr)
        sys.exit(1)


def main(argv=None):
    run_cli(run, parse_args(argv))


if __name__ == '__main__':
    main()
