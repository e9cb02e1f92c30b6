"""Figures for papers, from the files train.py writes: curves, t-SNE, per-class AP, generated images, attention.

    python plot.py curves --results result/synthetic_acnet_resnet50_512_results.csv [more CSVs ...]
    python plot.py tsne --data_base result/synthetic_acnet_resnet50_512_model.pth
    python plot.py per_class --data_base result/synthetic_acnet_resnet50_512_model.pth
    python plot.py generated --data_base result/synthetic_acnet_resnet50_512_model.pth --sketches DIR
    python plot.py attention --data_base result/synthetic_msedge_resnet50_512_model.pth --images DIR

Every figure goes to --save_root (default result/figures) under a name made from its input, with the data
behind it as a CSV where there is a table to give; each path is printed. Only files this repo wrote are
ever replaced.
  curves     every loss and metric per epoch of one or more runs, the selected epoch of each marked
  tsne       a seeded t-SNE of a run's saved val embeddings: classes by colour, sketches x, photos o
  per_class  each unseen class's mAP@all and P@100 from the saved embeddings, sorted
  generated  ACNet: the generator's photo-like image of every sketch in a folder, as files and a sheet
  attention  MSEdge: each image, the edge map the backbone sees and the two attention maps, as a sheet
"""
import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from methods import get_method, method_names
from utils import METRIC_NAMES, PHOTO, SKETCH, retrieval_metrics
from zs_sbir.checkpoint import CHECKPOINT_FORMAT, load_checkpoint_vectors, load_torch
from zs_sbir.evaluation import collapsed
from zs_sbir.cli import ArgumentParser, UserError, check_device, check_numbers, default_device, run_cli
from zs_sbir.images import load_image, walk_image_files
from zs_sbir.pictures import heatmap, save_png, sheet, to_pil
from zs_sbir.results import read_results
from zs_sbir.retrieval import load_model
from zs_sbir.safe_files import (OUTPUT_MARK, atomic_write, check_outside, check_replaceable, check_writable_dir,
                                make_output_folder, unique_stems, writing_into)


def pyplot():
    import matplotlib
    matplotlib.use('Agg')  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def save_figure(figure, path):
    atomic_write(path, lambda tmp: figure.savefig(tmp, format='png', dpi=120, bbox_inches='tight',
                                                  metadata={'Software': OUTPUT_MARK}))
    pyplot().close(figure)


def check_replaceable_csv(path, columns):
    """A CSV output is replaced only when it is one of ours: the same header."""
    path = Path(path)
    if path.exists() and path.read_text(errors='replace').split('\n', 1)[0].strip() != ','.join(columns):
        raise UserError(f"file '{path}' exists and was not written by this repo: choose another --save_root "
                        f"(nothing was written)")


def write_table(frame, path):
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False, float_format='%.6f', encoding='utf-8',
                                                errors='surrogateescape'))  # any file name


# ----------------------------------------------------------------------------------------------- curves

CURVE_COLUMNS = ['run', 'epoch', 'quantity', 'value', 'selected']


def run_names(paths):
    """A label per results CSV: its run prefix, with its folder where two runs share a name."""
    names = [Path(p).name.removesuffix('_results.csv') for p in paths]
    return [f'{Path(p).parent.name}/{n}' if names.count(n) > 1 else n for p, n in zip(paths, names)]


def curves_data(paths):
    """Tidy rows (run, epoch, quantity, value, selected) of every loss and metric column of each CSV;
    `selected` marks the epoch the run's selection rule picked."""
    rows = []
    for path, run in zip(paths, run_names(paths)):
        frame, best = read_results(path)
        names = (*METRIC_NAMES, 'precise')
        metrics = [m for m in (*names, *(f'heldout_{n}' for n in names)) if m in frame]
        for _, row in frame.iterrows():
            for quantity in [c for c in frame.columns if c.endswith('_loss')] + metrics:
                rows.append({'run': run, 'epoch': int(row['epoch']), 'quantity': quantity,
                             'value': float(row[quantity]), 'selected': int(row['epoch']) == int(best['epoch'])})
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def plot_curves(data):
    plt = pyplot()
    quantities = list(dict.fromkeys(data['quantity']))
    cols = min(4, len(quantities))
    rows = -(-len(quantities) // cols)
    figure, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows + 0.6), squeeze=False, layout='constrained')
    for ax, quantity in zip(axes.flat, quantities):
        for i, (run, part) in enumerate(data[data['quantity'] == quantity].groupby('run', sort=False)):
            colour = f'C{i % 10}'
            ax.plot(part['epoch'], part['value'], color=colour, label=run, marker='.')
            chosen = part[part['selected']]
            ax.plot(chosen['epoch'], chosen['value'], color=colour, marker='*', markersize=14, linestyle='none')
        ax.set_title(quantity)
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(quantities):]:
        ax.axis('off')
    from matplotlib.lines import Line2D
    handles, labels = axes.flat[0].get_legend_handles_labels()
    handles.append(Line2D([], [], color='grey', marker='*', markersize=12, linestyle='none'))
    figure.legend(handles, labels + ['selected epoch'], loc='outside upper center', ncol=min(4, len(labels) + 1),
                  fontsize=9)
    return figure


def curves(args):
    paths = [Path(p) for p in args.results]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"results CSV not found: '{missing[0]}'")
    data = curves_data(paths)
    name = run_names(paths)[0].replace('/', '_') + (f'_and_{len(paths) - 1}_more' if len(paths) > 1 else '')
    return write_outputs(args, f'{name}_curves', plot_curves(data), data, CURVE_COLUMNS)


def write_outputs(args, stem, figure, table=None, columns=None):
    """The figure (and its table) under --save_root, each checked before either is written."""
    root = Path(args.save_root)
    check_replaceable(root / f'{stem}.png')
    if table is not None:
        check_replaceable_csv(root / f'{stem}.csv', columns)
    save_figure(figure, root / f'{stem}.png') if hasattr(figure, 'savefig') else save_png(figure, root / f'{stem}.png')
    print(f'wrote {root / stem}.png')
    if table is not None:
        write_table(table, root / f'{stem}.csv')
        print(f'wrote {root / stem}.csv')
    return table


# ----------------------------------------------------------------------------------------------- embeddings

TSNE_COLUMNS = ['path', 'class', 'domain', 'x', 'y']
PER_CLASS_COLUMNS = ['class', 'mAP@all', 'P@100']


def run_stem(data_base):
    return Path(data_base).name.removesuffix('.pth').removesuffix('_model')


def saved_embeddings(args):
    checkpoint = load_torch(args.data_base, CHECKPOINT_FORMAT, 'checkpoint')
    record = load_checkpoint_vectors(args.data_base, checkpoint, args.vectors)[0]
    check_outside(args.save_root, [('the dataset', Path(record['data_root']) / record['data_name'])])
    return record


def tsne_data(record, max_points=3000, seed=0):
    """t-SNE coordinates of a seeded sample of at most `max_points` saved val embeddings (PCA to 50
    dimensions first), with each point's path, class and domain."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    if collapsed(record['vectors'].float()):
        raise UserError('every saved embedding is the same vector (the network collapsed): there is nothing to map')
    vectors = record['vectors'].float().numpy()  # unit vectors, as the method embedded them
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(vectors), size=min(len(vectors), max_points), replace=False))
    points = vectors[keep]
    if points.shape[1] > 50 and len(points) > 50:
        points = PCA(50, random_state=seed).fit_transform(points)
    perplexity = min(30.0, (len(points) - 1) / 3)
    xy = TSNE(2, init='pca', perplexity=perplexity, random_state=seed).fit_transform(points)
    labels, domains = record['labels'][keep].tolist(), record['domains'][keep].tolist()
    return pd.DataFrame({'path': [record['paths'][i] for i in keep], 'class': [record['classes'][c] for c in labels],
                         'domain': ['sketch' if d == SKETCH else 'photo' for d in domains],
                         'x': xy[:, 0], 'y': xy[:, 1]}, columns=TSNE_COLUMNS)


def plot_tsne(data, title):
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(7, 6))
    classes = sorted(set(data['class']))
    colours = plt.get_cmap('tab20' if len(classes) > 10 else 'tab10')
    for i, name in enumerate(classes):
        for domain, marker, size in (('photo', 'o', 10), ('sketch', 'x', 18)):
            part = data[(data['class'] == name) & (data['domain'] == domain)]
            ax.scatter(part['x'], part['y'], s=size, marker=marker, color=colours(i % colours.N), alpha=0.7,
                       label=name if domain == 'photo' else None)
    if len(classes) <= 25:
        ax.legend(fontsize=7, markerscale=1.5, loc='best', ncol=1 + len(classes) // 13)
    ax.set_title(f'{title}: t-SNE of {len(data)} val embeddings (o photo, x sketch)', fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return figure


def tsne(args):
    data = tsne_data(saved_embeddings(args), args.max_points, args.seed)
    stem = run_stem(args.data_base)
    return write_outputs(args, f'{stem}_tsne', plot_tsne(data, stem), data, TSNE_COLUMNS)


def per_class_data(record):
    """Each unseen class's mean over its sketch queries of the exact per-query mAP@all and P@100,
    sorted by mAP@all (best first)."""
    vectors, labels, domains = record['vectors'].float(), record['labels'], record['domains']
    sketch = domains == SKETCH
    values = retrieval_metrics(vectors[sketch], labels[sketch], vectors[domains == PHOTO], labels[domains == PHOTO],
                               per_query=True)
    frame = pd.DataFrame({'label': labels[sketch].numpy(), 'mAP@all': values['mAP@all'].numpy(),
                          'P@100': values['P@100'].numpy()}).groupby('label', sort=True).mean()
    frame.insert(0, 'class', [record['classes'][label] for label in frame.index])
    return frame.sort_values('mAP@all', ascending=False, kind='stable').reset_index(drop=True)[PER_CLASS_COLUMNS]


def plot_per_class(data, title):
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(7, 1.2 + 0.28 * len(data)))
    y = np.arange(len(data))
    ax.barh(y - 0.2, data['mAP@all'], height=0.4, label='mAP@all')
    ax.barh(y + 0.2, data['P@100'], height=0.4, label='P@100')
    ax.set_yticks(y, data['class'], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.legend(loc='lower right')
    ax.set_title(f'{title}: unseen classes, best first', fontsize=9)
    ax.grid(axis='x', alpha=0.3)
    return figure


def per_class(args):
    data = per_class_data(saved_embeddings(args))
    stem = run_stem(args.data_base)
    return write_outputs(args, f'{stem}_per_class', plot_per_class(data, stem), data, PER_CLASS_COLUMNS)


# ----------------------------------------------------------------------------------------------- pictures

def image_files(folder, option):
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{option} folder not found: '{folder}'")
    files, skipped = walk_image_files(folder)
    if skipped:
        raise UserError(f"{option} folder '{folder}': '{skipped[0][0]}' {skipped[0][1]}")
    if not files:
        raise UserError(f"{option} folder '{folder}' holds no .jpg/.jpeg/.png image")
    return across_folders([folder / p for p in files])


def across_folders(files):
    """Sorted files dealt out folder by folder (the first of each, then the second, ...), so that the
    first few on a sheet show every class of a dataset folder, not only the first one."""
    groups = {}
    for path in files:
        groups.setdefault(path.parent, []).append(path)
    rank = {path: (i, folder) for folder, members in groups.items() for i, path in enumerate(members)}
    return sorted(files, key=lambda path: (rank[path][0], str(rank[path][1])))


# What each picture command needs the model to draw, and what it is called
DRAWN = {'generated': ('generated', 'generated images'), 'attention': ('attention 3', 'attention maps')}


def model_drawing(args):
    """(model, its input size) of --data_base, refused in one line when its method does not draw what the command
    shows."""
    model, checkpoint = load_model(args.data_base, args.device)
    queries = Path(args.query_name)
    dataset = Path(checkpoint['args']['data_root']) / checkpoint['args']['data_name']
    check_outside(args.save_root, [('the dataset', dataset)] + ([('the --query_name folder', queries)]
                                                                 if queries.is_dir() else []))
    picture, noun = DRAWN[args.command]
    if picture not in model.draws:
        drawers = [name for name in method_names() if picture in get_method(name).draws]
        raise UserError(f"'{args.data_base}' is a {model.describe()} model, which draws no {noun}: `plot.py "
                        f"{args.command}` needs a model of {' or '.join(drawers) or 'a method that draws them'}")
    return model, checkpoint['args']['img_size']


def batches(files, size, interpolation, batch_size=32):
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        yield chunk, torch.stack([load_image(p, size, interpolation) for p in chunk])


@torch.inference_mode()
def generated(args):
    """The generator's image of each sketch, saved at the model's input size, and a contact sheet."""
    model, size = model_drawing(args)
    files = image_files(args.query_name, '--query_name')[:args.limit]
    stem = run_stem(args.data_base)
    folder, sheet_path = Path(args.save_root) / f'{stem}_generated', Path(args.save_root) / f'{stem}_generated.png'
    check_replaceable(folder)
    check_replaceable(sheet_path)
    names, outputs, pairs = iter(unique_stems(files)), {}, []
    for _, images in batches(files, size, model.interpolation):
        for image, fake in zip(images, model.pictures(images.to(args.device), SKETCH)['generated'].cpu()):
            outputs[next(names)] = fake
            pairs += [to_pil(image), to_pil(fake)]
    make_output_folder(folder)
    for name, fake in outputs.items():
        save_png(to_pil(fake), folder / f'{name}.png')
    per_row = 2 * args.columns
    save_png(sheet([pairs[i:i + per_row] for i in range(0, len(pairs), per_row)],
                   ['sketch', 'generated'] * (per_row // 2)), sheet_path)
    print(f'wrote {len(outputs)} images to {folder}/ and the sheet of the first {len(pairs) // 2} to {sheet_path}')
    return outputs


def infer_domain(folder, domain):
    if domain != 'auto':
        return SKETCH if domain == 'sketch' else PHOTO
    parts = Path(folder).resolve().parts
    for part in reversed(parts):
        if part in ('sketch', 'photo'):
            return SKETCH if part == 'sketch' else PHOTO
    raise UserError(f"cannot tell whether '{folder}' holds sketches or photos (no sketch/ or photo/ folder in its "
                    f"path): pass --domain sketch or --domain photo")


@torch.inference_mode()
def attention(args):
    """Each image and what the model draws of it (MSEdge: the edge map its backbone sees, where its --edge_mode feeds
    edges, and the two attention maps, laid over the image), as one sheet."""
    model, size = model_drawing(args)
    files = image_files(args.query_name, '--query_name')[:args.limit]
    domain = infer_domain(args.query_name, args.domain)
    path = Path(args.save_root) / f'{run_stem(args.data_base)}_attention.png'
    check_replaceable(path)
    rows, drawn = [], []
    for chunk, images in batches(files, size, model.interpolation):
        batch = {name: value.cpu() for name, value in model.pictures(images.to(args.device), domain).items()}
        for i, image in enumerate(images):
            base = to_pil(image)
            pictures = {name: value[i] for name, value in batch.items()}
            rows.append([base] + [heatmap(v, base) if v.ndim == 2 else to_pil(v) for v in pictures.values()])
            drawn.append(pictures)
    save_png(sheet(rows, ['image', *batch]), path)
    print(f'wrote {path} ({len(rows)} images)')
    return drawn


# -----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest='command', required=True)
    renamed = {'--sketches': '--query_name', '--images': '--query_name'}  # their names before one name per concept
    parsers = {name: commands.add_parser(name, help=help_text, renamed=renamed) for name, help_text in (
        ('curves', 'losses and metrics per epoch of one or more runs'),
        ('tsne', "t-SNE of a run's saved val embeddings"),
        ('per_class', "each unseen class's mAP@all and P@100"),
        ('generated', "ACNet: the generator's image of every sketch in a folder"),
        ('attention', 'MSEdge: edge maps and attention maps of every image in a folder'))}
    parsers['curves'].add_argument('--results', nargs='+', required=True, help='results CSVs written by train.py')
    for name in ('tsne', 'per_class', 'generated', 'attention'):
        parsers[name].add_argument('--data_base', required=True, help='a checkpoint written by train.py')
    for name in ('tsne', 'per_class'):
        parsers[name].add_argument('--vectors', default=None, help='val embeddings (default: the _vectors.pth beside it)')
    parsers['tsne'].add_argument('--max_points', type=int, default=3000, help='embeddings sampled (seeded)')
    parsers['tsne'].add_argument('--seed', type=int, default=1, help='the sample and the t-SNE layout')
    parsers['generated'].add_argument('--query_name', required=True, help='a folder of sketches (searched recursively)')
    parsers['generated'].add_argument('--columns', type=int, default=4, help='sketch/generated pairs per sheet row')
    parsers['generated'].add_argument('--limit', type=int, default=24,
                                      help='sketches generated, saved and on the sheet (the first of each folder, then '
                                           'the second, ...)')
    parsers['attention'].add_argument('--query_name', required=True, help='a folder of sketches or photos')
    parsers['attention'].add_argument('--domain', default='auto', choices=['auto', 'sketch', 'photo'],
                                      help='what the images are (auto: from a sketch/ or photo/ folder in the path)')
    parsers['attention'].add_argument('--limit', type=int, default=12, help='images on the sheet (the first of each folder, then the second, ...)')
    for name in ('generated', 'attention'):
        parsers[name].add_argument('--device', default=default_device())
    for parser in parsers.values():
        parser.add_argument('--save_root', default='result/figures', help='where the figures go')
    return p.parse_args(argv)


def run(args):
    empty = [f'--{k}' for k, v in vars(args).items() if v == '' or (isinstance(v, list) and '' in v)]
    if empty:
        raise UserError(f'{", ".join(empty)} must not be empty')
    check_writable_dir(args.save_root, '--save_root')
    check_numbers(args)
    if getattr(args, 'device', None):
        check_device(args.device)
    with writing_into(args.save_root):  # one plot.py writing into a folder at a time
        return {'curves': curves, 'tsne': tsne, 'per_class': per_class, 'generated': generated,
                'attention': attention}[args.command](args)


def main(argv=None):
    return run_cli(run, parse_args(argv))


if __name__ == '__main__':
    main()
