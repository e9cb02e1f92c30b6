"""Show the top-k photos a trained model retrieves for any sketch, or re-evaluate a saved model.

    python test.py                                             # right after the README quick start
    python test.py --query_name my_sketch.png --num 8          # any image file, any size or mode
    python test.py --query_name data/sketchy/val/sketch/cow    # a folder: every image in it
    python test.py --evaluate --data_base result/sketchy_acnet_resnet50_512_model.pth

--data_base is a checkpoint written by train.py (or convert.py); its val embeddings (the gallery) are read
from the _vectors.pth file beside it. A converted release has none: its gallery, the val photos of
--data_root/--data_name, is embedded first. For every query this writes {save_root}/{query stem}.png: the query, then
its top-k photos, each framed green (same class as the query) or red (another class) with its cosine
similarity and class. The query's class is its folder name when that is a val class (else the frames
are grey). The seed's loose files go to {save_root}/{query stem}/: query.jpg and
retrieval_{rank}_{similarity}.jpg. test.py replaces only files it wrote itself: a picture or folder of
that name that is not its own, a query image, or a --save_root inside the dataset stops it before it
writes anything.
"""
import argparse
from pathlib import Path

import torch

from methods import add_own_options, get_method, method_names
from utils import CONVENTIONS, PHOTO, SKETCH, VAL_CLASSES, hold_out, metric_name, scan_split
from zs_sbir import safe_files
from zs_sbir.checkpoint import load_checkpoint_vectors, vectors_record
from zs_sbir.cli import DEFAULT_WORKERS, ArgumentParser, UserError, check_device, check_numbers, default_device, run_cli
from zs_sbir.evaluation import (embed_split, fine_grained_metrics, format_fine_grained, format_metrics, gzs_metrics,
                                gzs_seen_items, gzs_shortfall, make_eval_loader, describe_pairs, split_images,
                                split_metrics)
from zs_sbir.images import load_image, query_files, read_rgb
from zs_sbir.onnx_runtime import RUNTIMES
from zs_sbir.precision import PRECISION_HELP, PRECISIONS, with_precision
from zs_sbir.pictures import draw_retrieval, fit_tile, heatmap, save_png
from zs_sbir.retrieval import Gallery, embed, load_model
from zs_sbir.safe_files import atomic_write, make_output_folder
from zs_sbir.seeding import seed_everything


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--query_name', nargs='+', default=None,
                   help='sketch image files or folders (default: the first val sketch of every val class)')
    p.add_argument('--data_base', default='result/synthetic_acnet_resnet50_512_model.pth',
                   help='checkpoint written by train.py (the *_model.pth file)')
    p.add_argument('--vectors', default=None, help='gallery embeddings (default: the *_vectors.pth beside it)')
    p.add_argument('--num', type=int, default=5, help='how many photos to retrieve per query')
    p.add_argument('--save_root', default='result', help='where the pictures go')
    p.add_argument('--data_root', default=None, help='datasets root (default: the one used in training)')
    p.add_argument('--data_name', default=None, help='dataset name (default: the one used in training)')
    p.add_argument('--show_generated', action='store_true',
                   help="also draw what a method shows only on request (ACNet: the generator's photo-like image)")
    p.add_argument('--evaluate', action='store_true', help='recompute the metrics of the model on its val split')
    p.add_argument('--gzs', action='store_true', help='with --evaluate: generalized ZS-SBIR too (docs/metrics.md)')
    p.add_argument('--fine_grained', action='store_true',
                   help="with --evaluate: fine-grained ZS-SBIR too, Acc@1/5/10 of each sketch's own photo among the "
                        "photos of its class (pairs by Sketchy's file names; docs/metrics.md)")
    p.add_argument('--metric_convention', default=None, choices=CONVENTIONS,
                   help="with --evaluate: the metrics printed (docs/metrics.md; default: the run's, its method's "
                        "paper's); both are returned")
    p.add_argument('--val_classes', default=None, choices=VAL_CLASSES,
                   help="TU-Berlin's val classes: the seeds' rule or all (default: the run's, its method's)")
    p.add_argument('--workers', type=int, default=DEFAULT_WORKERS, help='data loader processes for --evaluate')
    p.add_argument('--device', default=default_device())
    p.add_argument('--runtime', default='auto', choices=RUNTIMES,
                   help='what embeds the images: torch, or ONNX Runtime with the graphs exported beside the checkpoint '
                        '(docs/speed.md); auto: onnx on a CPU, where it is the faster (1.1-2x), torch on a GPU')
    p.add_argument('--precision', default='fp32', choices=PRECISIONS, help=PRECISION_HELP)
    free = p.add_argument_group('training-free baseline: --evaluate --training_free scores a backbone with no training '
                                '(docs/training.md); --data_root/--data_name default to data/sketchy')
    free.add_argument('--training_free', action='store_true', help='no checkpoint: the backbone as it comes')
    free.add_argument('--method', default='acnet', choices=method_names(), help='whose pooling and inputs')
    free.add_argument('--backbone_type', default=None, help="as train.py's (default: the method's)")
    free.add_argument('--img_size', type=int, default=224)
    for name in method_names():  # the options that shape a method's baseline (MSEdge: --edge_mode)
        if get_method(name).training_free_options:
            add_own_options(p.add_argument_group(f'training-free baseline of --method {name}'), get_method(name),
                            get_method(name).training_free_options)
    free.add_argument('--eval_batch_size', type=int, default=128)
    free.add_argument('--seed', type=int, default=1, help="random init (--no_pretrained) and GZS's draw")
    weights = free.add_mutually_exclusive_group()
    weights.add_argument('--weights', default=None, help='local ImageNet (or CLIP, DINOv2) weights for the backbone')
    weights.add_argument('--no_pretrained', action='store_true', help='random initialisation (offline)')
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Loading what train.py saved

def val_classes_of(args, checkpoint=None):
    """Which TU-Berlin val classes count: --val_classes, else the run's, else its method's rule."""
    if args.val_classes:
        return args.val_classes
    if checkpoint is None:
        return get_method(args.method).defaults['val_classes']
    return checkpoint['args'].get('val_classes') or \
        get_method(checkpoint['method'], checkpoint['args']).defaults['val_classes']


def load_run(args):
    """The model, its training arguments and (unless evaluating) the gallery embeddings, all checked."""
    model, checkpoint = load_model(args.data_base, args.device, args.runtime, precision=args.precision)
    args.val_classes = val_classes_of(args, checkpoint)
    train_args = checkpoint['args']
    data_root = Path(args.data_root or train_args['data_root'])
    data_name = args.data_name or train_args['data_name']
    if args.precision == 'int8':  # quantized on first use: calibrated on the training split of the dataset named here
        model.calibration = data_root / data_name / 'train'
    if args.evaluate:
        return model, checkpoint, None, data_root, data_name
    if not (args.vectors or checkpoint['vectors_file']):  # a converted release: no saved gallery
        return model, checkpoint, embed_gallery(args, model, checkpoint, data_root, data_name), data_root, data_name
    vectors, vectors_path = load_checkpoint_vectors(args.data_base, checkpoint, args.vectors)
    data_root = Path(args.data_root or vectors['data_root'])
    data_name = args.data_name or vectors['data_name']
    check_gallery(vectors, vectors_path, data_root, data_name, args.val_classes)
    return model, checkpoint, vectors, data_root, data_name


def split_of_run(checkpoint, data_root, data_name, name, val_classes):
    """A split as the run saw it: without the images --skip_bad_images left out in training."""
    skipped = set((checkpoint.get('skipped_images') or {}).get(name, []))
    split = scan_split(data_root, data_name, name, keep_broken_links=bool(skipped), val_classes=val_classes)
    if skipped:
        split = split.subset([i for i, p in enumerate(split.paths) if p not in skipped])
    return split, len(skipped)


def check_gallery(vectors, vectors_path, data_root, data_name, val_classes):
    """The saved embeddings must describe exactly the images of the val split on disk (less those that
    --skip_bad_images left out in training)."""
    skipped = set(vectors['skipped'])
    split = scan_split(data_root, data_name, 'val', keep_broken_links=bool(skipped), val_classes=val_classes)
    saved, on_disk = set(vectors['paths']), set(split.paths) - skipped
    if saved != on_disk:
        raise UserError(f"gallery embeddings in '{vectors_path}' do not match the dataset at '{split.root}': "
                        f"{len(saved - on_disk)} embedded images are not on disk and {len(on_disk - saved)} images "
                        f"on disk were not embedded; pass the --data_root used in training or retrain")


def embed_images_of(args, model, img_size, batch_size, split, desc='embed val'):
    """Embeddings of every image of a split, as the method's evaluation sees them."""
    loader = make_eval_loader(split, split_images(split, model, img_size), batch_size, args.workers, args.device)
    return embed_split(model, loader, torch.device(args.device), desc=desc)


def embed_gallery(args, model, checkpoint, data_root, data_name):
    """The val photos' embeddings, in the vectors-file layout, for a checkpoint that has none saved."""
    split = scan_split(data_root, data_name, 'val', val_classes=args.val_classes)
    split = split.subset(split.indices(PHOTO))
    print(f'{args.data_base} has no saved gallery: embedding the {len(split)} val photos of {split.root}')
    vectors = embed_images_of(args, model, checkpoint['args']['img_size'],
                              checkpoint['args'].get('eval_batch_size', 128), split)
    return vectors_record(vectors, split, checkpoint['method'], data_root, data_name, checkpoint['epoch'],
                          checkpoint.get('run_id'))


def default_queries(data_root, data_name, val_classes):
    """The first sketch of every val class."""
    split = scan_split(data_root, data_name, 'val', val_classes=val_classes)
    first = {}
    for path, label, domain in zip(split.paths, split.labels, split.domains):
        if domain == SKETCH:
            first.setdefault(label, split.root / path)
    return [first[label] for label in sorted(first)]


# ----------------------------------------------------------------------------------------------
# Retrieval and drawing

def photo_gallery(vectors, root):
    """The val photos of a vectors record as a Gallery: their saved embeddings, paths under `root`, class names."""
    rows = (vectors['domains'] == PHOTO).nonzero()[:, 0].tolist()
    return Gallery(vectors['vectors'][rows].float(), [Path(root) / vectors['paths'][row] for row in rows],
                   [vectors['classes'][vectors['labels'][row]] for row in rows])


def plan_outputs(files, save_root, dataset):
    """(query, picture path, loose-files folder) per query, every target checked before anything is written."""
    plan = safe_files.plan_outputs(files, save_root, [('the dataset', dataset)],
                                   lambda root, stem: [root / f'{stem}.png', root / stem])
    return [(path, picture, folder) for path, (picture, folder) in plan]


def gallery_photo(path):
    try:
        return read_rgb(path)
    except UserError as error:
        raise UserError(f'gallery photo unreadable (changed since the gallery was embedded?): {error}') from error


def retrieve(args, model, checkpoint, vectors, data_root, data_name):
    img_size = checkpoint['args']['img_size']
    gallery = photo_gallery(vectors, Path(data_root) / data_name / 'val')
    files = query_files(args.query_name) if args.query_name else default_queries(data_root, data_name,
                                                                                 args.val_classes)
    with safe_files.writing_into(args.save_root):
        for path, picture_path, folder in plan_outputs(files, args.save_root, Path(data_root) / data_name):
            query_class = path.parent.name if path.parent.name in vectors['classes'] else None
            shown, results = retrieval(args, model, img_size, gallery, path, query_class)
            query = read_rgb(path)
            save_png(draw_retrieval(query, shown, [(photo, f'{similarity:.3f}\n{name}', match)
                                                   for _, similarity, name, photo, match in results]), picture_path)
            write_loose_files(folder, query, results)
            matches = sum(match for *_, match in results) if query_class else 0
            print(f'{path} -> {picture_path}' + (f', {matches}/{len(results)} of class {query_class}' if query_class
                                                 else ''))
            for rank, (photo_path, similarity, name, _, _) in enumerate(results, 1):
                print(f'  {rank:>3}  {similarity:.4f}  {name:<20} {photo_path}')


def retrieval(args, model, img_size, gallery, path, query_class):
    """The pictures of what the model made of one query, and its top --num photos: [(path, similarity, class,
    picture, same class as the query (None when that is unknown))]."""
    image = load_image(path, img_size, model.interpolation)
    x, domain = image.unsqueeze(0).to(args.device), torch.tensor([SKETCH], device=args.device)
    query = embed(model, x, domain)[0]
    with torch.inference_mode():
        drawn = model.pictures(x, SKETCH)
    shown = [(name, heatmap(value[0].cpu(), fit_tile(image)) if value.ndim == 3 else value[0].cpu())
             for name, value in drawn.items() if name not in model.optional_pictures or args.show_generated]
    results = [(hit.path, hit.similarity, hit.name, gallery_photo(hit.path),
                None if query_class is None else hit.name == query_class) for hit in gallery.top_k(query, args.num)]
    return shown, results


def write_loose_files(folder, query, results):
    """The seed's layout: query.jpg and retrieval_{rank}_{similarity}.jpg in one folder per query. Only the
    files of an earlier test.py run are replaced."""
    make_output_folder(folder)
    for old in [folder / 'query.jpg', *folder.glob('retrieval_*_*.jpg')]:
        old.unlink(missing_ok=True)
    atomic_write(folder / 'query.jpg', lambda tmp: query.save(tmp, format='JPEG'))
    for rank, (_, similarity, _, photo, _) in enumerate(results, 1):
        atomic_write(folder / f'retrieval_{rank}_{similarity:.4f}.jpg', lambda tmp, p=photo: p.save(tmp, format='JPEG'))


def evaluate(args, model, checkpoint, data_root, data_name):
    """Recompute the metrics of the saved model on a val split (and with --gzs, generalized ZS-SBIR's)."""
    split, skipped = split_of_run(checkpoint, data_root, data_name, 'val', args.val_classes)
    if skipped:
        print(f'leaving out the {skipped} val images that training left out (--skip_bad_images)')
    trained = checkpoint['args']
    seen = gzs_seen_of_run(checkpoint, data_root, data_name, split, args.val_classes) if args.gzs else None
    metrics = score(args, model, trained['img_size'], trained.get('eval_batch_size', 128), split, seen)
    convention = args.metric_convention or trained.get('metric_convention') or \
        get_method(checkpoint['method'], trained).defaults['metric_convention']
    report(args.data_base, split, metrics, convention)
    trained_on = (str(trained['data_root']), trained['data_name'])
    logged = checkpoint['metrics']
    if metric_name('precise', convention) in logged and (str(data_root), data_name) == trained_on:
        report(f'training log, best epoch {checkpoint["epoch"]}', None, logged, convention)
    return metrics


def gzs_seen_of_run(checkpoint, data_root, data_name, val, val_classes):
    """The seen items generalized ZS-SBIR adds, drawn as the run drew them: from the images it held out of
    training (its --heldout_fraction and --seed). A run that held none out trained on them; said."""
    trained = checkpoint['args']
    train_split, _ = split_of_run(checkpoint, data_root, data_name, 'train', val_classes)
    _, heldout = hold_out(train_split, trained.get('heldout_fraction', 0.1), trained.get('seed', 1))
    if not (trained.get('gzs') or trained.get('select_on') == 'heldout') and checkpoint['epoch'] is not None:
        print('note: this run trained on every seen image, so the seen items of GZS are training images (as in '
              "SEM-PCYC's own code); train with --gzs to hold them out")
    return gzs_seen_items(heldout, val, trained.get('seed', 1))


def score(args, model, img_size, batch_size, split, seen=None):
    """The four metrics of `model` on a val split; with `seen` (GZS's seen items) the generalized ones too, with
    --fine_grained the fine-grained ones."""
    if args.fine_grained:  # before embedding anything: a dataset without pairs is one line
        print(describe_pairs(split))
    vectors = embed_images_of(args, model, img_size, batch_size, split)
    metrics = split_metrics(vectors, split)
    if args.fine_grained:
        metrics.update(fine_grained_metrics(vectors, split))
    if seen is not None:
        print(f'GZS: {seen.count(SKETCH)} seen sketches and {seen.count(PHOTO)} seen photos join the unseen test '
              f'set{gzs_shortfall(seen, split)}')
        seen_vectors = embed_images_of(args, model, img_size, batch_size, seen, 'embed GZS seen')
        gzs = gzs_metrics(vectors, split, seen_vectors, seen)
        metrics.update({f'gzs_{name}': value for name, value in gzs.items()})
    return metrics


def report(what, split, metrics, convention='sake'):
    print(f'{what}{f" on {split.root}" if split else ""}: {format_metrics(metrics, convention)}')
    if 'gzs_' + metric_name('precise', convention) in metrics:
        print(f'  GZS (seen and unseen classes): {format_metrics(metrics, convention, prefix="gzs_")}')
    if 'fg_Acc@1' in metrics:
        print(f"  fine-grained (each sketch's own photo among its class's photos): {format_fine_grained(metrics)}")


def training_free(args):
    """--evaluate --training_free: a backbone with no training, scored on a val split (and GZS's)."""
    data_root, data_name = args.data_root or 'data', args.data_name or 'sketchy'
    method = get_method(args.method)
    args.val_classes = val_classes_of(args)
    args.backbone_type = args.backbone_type or method.defaults['backbone_type']
    method.check_backbone(args.backbone_type)  # an unknown name: one line, naming close matches
    seed_everything(args.seed)
    model = with_precision(method.training_free(args, not args.no_pretrained, args.weights).to(args.device).eval(),
                           args.precision, args.device)
    split = scan_split(data_root, data_name, 'val', val_classes=args.val_classes)
    seen = gzs_seen_items(hold_out(scan_split(data_root, data_name, 'train'), 0.1, args.seed)[1], split, args.seed) \
        if args.gzs else None
    metrics = score(args, model, args.img_size, args.eval_batch_size, split, seen)
    source = 'random init' if args.no_pretrained else args.weights or 'pretrained weights'
    report(f'{args.method} {model.backbone_tag} ({source}), no training', split, metrics,
           args.metric_convention or get_method(args.method).defaults['metric_convention'])
    return metrics


def run(args):
    empty = [f'--{name}' for name in ('data_base', 'vectors', 'save_root', 'data_root', 'data_name')
             if getattr(args, name) == ''] + (['--query_name'] if '' in (args.query_name or []) else [])
    if empty:
        raise UserError(f'{", ".join(empty)} must not be empty')
    check_numbers(args)  # --num, --workers, --img_size, ... (cli.LIMITS), the training-free ones too
    check_device(args.device)
    if args.training_free or args.gzs or args.fine_grained:
        if not args.evaluate:
            raise UserError('--training_free, --gzs and --fine_grained go with --evaluate')
        if args.training_free:
            if args.runtime == 'onnx':
                raise UserError('--runtime onnx exports a checkpoint\'s networks: --training_free has none (leave '
                                '--runtime out)')
            if args.precision == 'int8':
                raise UserError('--precision int8 quantizes a checkpoint\'s exported networks: --training_free has '
                                'none (use fp32 or bf16)')
            return training_free(args)
    model, checkpoint, vectors, data_root, data_name = load_run(args)
    if args.show_generated and args.evaluate:
        raise UserError('--show_generated adds pictures to the retrievals test.py draws: leave out --evaluate, or it')
    if args.show_generated and not model.optional_pictures:
        raise UserError(f"--show_generated: '{args.data_base}' ({checkpoint['method']}) draws nothing on request; "
                        f'leave it out')
    if args.evaluate:
        return evaluate(args, model, checkpoint, data_root, data_name)
    retrieve(args, model, checkpoint, vectors, data_root, data_name)


def main(argv=None):
    return run_cli(run, parse_args(argv))


if __name__ == '__main__':
    main()
