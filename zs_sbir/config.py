"""train.py's options (the seeds' names and defaults; each method adds its own, methods/), their checks, and the
names of a run's files: shared by train.py and by the scripts that start or read runs (reproduce.py,
convert.py)."""
import argparse
from dataclasses import dataclass
from pathlib import Path

from methods import get_method, method_names, option_owners
from zs_sbir.cli import DEFAULT_WORKERS, ArgumentParser, Limit, UserError, check_device, default_device, number_problems
from utils import CONVENTIONS, VAL_CLASSES
from zs_sbir.results import SELECT_ON

SELECT_TEXT = {'test': 'the unseen test classes (as the seeds do)', 'heldout': 'held-out seen-class images'}

# Options that define a run's results (with every method's own options): --resume refuses to continue a run under
# different ones.
COMMON_RUN_DEFINING = ('method', 'data_name', 'backbone_type', 'emb_dim', 'batch_size', 'warmup', 'lr', 'img_size',
                       'seed', 'select_on', 'metric_convention', 'val_classes', 'heldout_fraction', 'skip_bad_images',
                       'eval_queries', 'gzs', 'fine_grained')


def run_defining():
    return COMMON_RUN_DEFINING + tuple(dest for dest in option_owners() if dest not in COMMON_RUN_DEFINING)


def method_default_text(option):
    """`--help`'s account of a default that each method sets, e.g. '1e-05 for acnet and msedge, none for
    clipprompt'."""
    by_value = {}
    for name in method_names():
        method = get_method(name)
        by_value.setdefault(method.default_notes.get(option, method.defaults[option]), []).append(name)
    return ', '.join(f'{value} for {" and ".join(names)}' for value, names in by_value.items())


def parse_args(argv=None, description=None):
    """train.py's options; `description`: the --help text (train.py's docstring)."""
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--method', default='acnet', choices=method_names())
    p.add_argument('--data_root', default='data', help='datasets root path')
    p.add_argument('--data_name', default='sketchy',
                   help='sketchy, tuberlin, synthetic, or any dataset folder under data_root (tuberlin* folders '
                        'get the TU-Berlin val rule)')
    p.add_argument('--backbone_type', default=None,
                   help="resnet50 or vgg16 with each method's original ImageNet weights, or any timm name "
                        f'with an optional pretrained tag (e.g. resnet50.a1_in1k); default: '
                        f'{method_default_text("backbone_type")}')
    p.add_argument('--emb_dim', '--proj_dim', dest='emb_dim', type=int, default=None,
                   help=f'embedding dim (default: {method_default_text("emb_dim")})')
    p.add_argument('--batch_size', type=int, default=64,
                   help='images per step and process (a method trained on pairs takes batch_size // 2 of them)')
    p.add_argument('--epochs', type=int, default=None, help=f'default: {method_default_text("epochs")}')
    p.add_argument('--warmup', type=int, default=None,
                   help=f'epochs with a frozen backbone (default: {method_default_text("warmup")})')
    p.add_argument('--save_root', default='result', help='where results and checkpoints go')
    p.add_argument('--lr', type=float, default=None,
                   help=f'learning rate of the backbone and embedding layer (default: {method_default_text("lr")})')
    p.add_argument('--gzs', action='store_true',
                   help='also score generalized ZS-SBIR every epoch (docs/metrics.md): seen-class sketches and photos, '
                        'held out of training, join the queries and the gallery')
    p.add_argument('--fine_grained', action='store_true',
                   help="also score fine-grained ZS-SBIR every epoch (docs/metrics.md): Acc@1/5/10 of each sketch's "
                        "own photo among the photos of its class (pairs by Sketchy's file names)")
    p.add_argument('--select_on', default='test', choices=SELECT_ON,
                   help="pick the best epoch on the unseen test classes (the seeds' way, to reproduce their "
                        'tables) or on held-out images of the seen classes (no test-set selection)')
    p.add_argument('--metric_convention', default=None, choices=CONVENTIONS,
                   help="the metrics printed, selected on and tabled (both are saved; docs/metrics.md): SAKE's or "
                        f"torchmetrics 1.0's (default: {method_default_text('metric_convention')})")
    p.add_argument('--val_classes', default=None, choices=VAL_CLASSES,
                   help="TU-Berlin (tuberlin* folders): leave out the val classes with fewer than 400 photos, as the "
                        "seeds do, or keep them all, as ClipPrompt does (default: "
                        f"{method_default_text('val_classes')})")
    p.add_argument('--heldout_fraction', type=float, default=0.1,
                   help="with --select_on heldout or --gzs: share of every seen class's sketches and photos held out")
    p.add_argument('--img_size', type=int, default=224, help='input images are resized to this square')
    p.add_argument('--seed', type=int, default=1)
    p.add_argument('--workers', type=int, default=DEFAULT_WORKERS, help='data loader processes')
    p.add_argument('--eval_batch_size', type=int, default=None, help='default: 2 x batch_size')
    p.add_argument('--eval_queries', type=int, default=0,
                   help='evaluate each epoch on this many val sketches (a fixed, seeded sample; all photos stay in '
                        'the gallery), then the selected epoch on all of them; 0: all, every epoch')
    p.add_argument('--device', default=default_device())
    for name in method_names():
        get_method(name).add_options(p)
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
    method = get_method(args.method, args)
    for option, default in method.defaults.items():  # the defaults that are the method's own
        if getattr(args, option) is None:
            setattr(args, option, default)
            if option == 'warmup':  # a method's warm-up, when not asked for, fits in a shorter run
                args.warmup = min(default, max(args.epochs or default, 0))
    if args.eval_batch_size is None:
        args.eval_batch_size = 2 * args.batch_size
    method.complete(args)
    return args


def check_args(args):
    """Reject nonsense before any work starts."""
    method = get_method(args.method, args)
    # every numeric option in one place (cli.LIMITS); a method's batches may need more than one image
    problems = number_problems(args, batch_size=Limit(method.min_batch_size, 65536))
    if args.warmup is not None and args.epochs is not None and args.warmup > args.epochs:
        problems.append(f'--warmup must be between 0 and --epochs ({args.epochs}), got {args.warmup}')
    if args.warmup and not method.warms_up:
        problems.append(f'--warmup: --method {args.method} freezes nothing while warming up, got {args.warmup}')
    if not 0 < args.heldout_fraction < 1:
        problems.append(f'--heldout_fraction must be between 0 and 1, got {args.heldout_fraction}')
    if args.resume and args.overwrite:
        problems.append('--resume and --overwrite exclude each other')
    problems += [f'--{name} must not be empty' for name in ('data_root', 'save_root') if not getattr(args, name)]
    if not args.data_name or Path(args.data_name).name != args.data_name or args.data_name in ('.', '..'):
        problems.append(f'--data_name must be the name of a folder in --data_root, got {args.data_name!r}')
    problems += foreign_options(args, method)
    problems += method.check(args)
    try:
        method.check_backbone(args.backbone_type)
    except UserError as error:  # a backbone timm (or open_clip) does not know, with the close matches
        problems.append(str(error))
    if problems:
        raise UserError('; '.join(problems))
    check_device(args.device)


def foreign_options(args, method):
    """Options of another method than the one chosen, given other values than their defaults: refused."""
    foreign = {}
    for dest, (owner, default) in option_owners().items():
        if not issubclass(method, owner) and getattr(args, dest, default) != default:
            foreign.setdefault(owner.name, []).append(f'--{dest}')
    return [f'{" and ".join(names)} appl{"y" if len(names) > 1 else "ies"} to --method {owner} only'
            for owner, names in foreign.items()]


def run_prefix(args):
    """{data_name}_{method}_{backbone_type}_{emb_dim}, plus what sets a variant apart from the original (the
    method's file_suffix, e.g. ACNet's loss options, MSEdge's --edge_mode), so variants never share files."""
    prefix = f'{args.data_name}_{args.method}_{args.backbone_type.replace("/", "-")}_{args.emb_dim}'
    method = get_method(args.method, args)
    prefix += method.file_suffix(args)
    convention = getattr(args, 'metric_convention', None) or method.defaults['metric_convention']
    prefix += '' if convention == method.defaults['metric_convention'] else f'_{convention}'  # it selects other epochs
    rule = getattr(args, 'val_classes', None) or method.defaults['val_classes']
    if args.data_name.startswith('tuberlin') and rule != method.defaults['val_classes']:
        prefix += f'_val-{rule}'  # another test set
    prefix += '_heldout' if getattr(args, 'select_on', 'test') == 'heldout' else ''  # trained on fewer images
    prefix += '_gzs' if getattr(args, 'gzs', False) else ''  # GZS runs train on fewer images
    return prefix + ('_fg' if getattr(args, 'fine_grained', False) else '')  # more columns in its CSV


@dataclass
class RunFiles:
    """A run's files in --save_root (docs/runs.md), and the lock that a running run holds."""
    results: Path
    model: Path
    vectors: Path
    last: Path
    bad_images: Path
    lock: Path

    def outputs(self):
        return [self.results, self.model, self.vectors, self.last, self.bad_images]


def run_files(args):
    root, prefix = Path(args.save_root), run_prefix(args)
    return RunFiles(results=root / f'{prefix}_results.csv', model=root / f'{prefix}_model.pth',
                    vectors=root / f'{prefix}_vectors.pth', last=root / f'{prefix}_last.pth',
                    bad_images=root / f'{prefix}_bad_images.txt', lock=root / f'.{prefix}.lock')
