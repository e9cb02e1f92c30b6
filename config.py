"""train.py's options (the seeds' names and defaults), their checks, and the names of a run's files: shared by
train.py, and by the scripts that start or read runs (reproduce.py, convert.py)."""
import argparse
from dataclasses import dataclass
from pathlib import Path


from cli import DEFAULT_WORKERS, MAX_WORKERS, ArgumentParser, UserError, check_device, default_device
from model import CLASS_LOSSES, EDGE_MODES, METHODS, backbone_tag, default_levels
from utils import SELECT_KEY

DEFAULT_WARMUP = {'acnet': 1, 'msedge': 2}


SELECT_TEXT = {'test': 'the unseen test classes (as the seeds do)', 'heldout': 'held-out seen-class images'}


# Options that define a run's results: --resume refuses to continue a run under different ones.
RUN_DEFINING = ('method', 'data_name', 'backbone_type', 'emb_dim', 'batch_size', 'warmup', 'lr', 'edge_mode',
                'img_size', 'seed', 'select_on', 'heldout_fraction', 'skip_bad_images', 'loss_weights', 'class_on',
                'eval_queries', 'class_loss', 'extractor_only', 'feature_levels', 'gzs')


# ACNet's loss: adversarial + 0.1 * identity + 10 * class, the class loss on E(sketch), E(photo), E(G(sketch)).
DEFAULT_LOSS_WEIGHTS, CLASS_INPUTS = (1.0, 0.1, 10.0), ('sketch', 'photo', 'fake')


def parse_args(argv=None, description=None):
    """train.py's options; `description`: the --help text (train.py's docstring)."""
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument('--lr', type=float, default=None,
                   help='learning rate of the backbone and embedding layer (default 1e-5; 1e-4 with --extractor_only, '
                        "as the original's extractor-only baselines)")
    p.add_argument('--edge_mode', default='both', choices=EDGE_MODES,
                   help='msedge: which domains are fed as edge maps')
    p.add_argument('--loss_weights', type=float, nargs=3, default=list(DEFAULT_LOSS_WEIGHTS),
                   metavar=('ADV', 'IDENTITY', 'CLASS'),
                   help='acnet: weights of the adversarial, identity and class losses (identity 0: not computed)')
    p.add_argument('--class_on', nargs='+', default=list(CLASS_INPUTS), choices=CLASS_INPUTS,
                   help='acnet: the embeddings the class loss sees (fake: of the generated images)')
    p.add_argument('--class_loss', default='normsoftmax', choices=CLASS_LOSSES,
                   help='acnet: the class loss (ce: a cross-entropy head, 04de2e0; triplet: with --extractor_only, '
                        'ablation/triplet.py)')
    p.add_argument('--extractor_only', action='store_true',
                   help='acnet: no generator or discriminator, the extractor alone on single sketches and photos '
                        '(the original ablation/norm.py and ablation/triplet.py)')
    p.add_argument('--feature_levels', type=int, nargs=3, default=None, metavar='LEVEL',
                   help="msedge: the backbone's feature levels to fuse (timm features_only indices; default: the "
                        'seeds\' 2 3 4 for ResNet50 and VGG16, else the last three; 1 2 4 is EGFF 75d71f0)')
    p.add_argument('--gzs', action='store_true',
                   help='also score generalized ZS-SBIR every epoch (docs/metrics.md): seen-class sketches and photos, '
                        'held out of training, join the queries and the gallery')
    p.add_argument('--select_on', default='test', choices=list(SELECT_KEY),
                   help="pick the best epoch on the unseen test classes (the seeds' way, to reproduce their "
                        'tables) or on held-out images of the seen classes (no test-set selection)')
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
    if args.warmup is None:  # the original extractor-only baselines froze nothing
        args.warmup = 0 if args.extractor_only else DEFAULT_WARMUP[args.method]
    if args.lr is None:
        args.lr = 1e-4 if args.extractor_only else 1e-5
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
    if not 0 <= args.workers <= MAX_WORKERS:
        problems.append(f'--workers must be from 0 to {MAX_WORKERS}, got {args.workers}')
    for name in ('emb_dim', 'batch_size', 'eval_batch_size'):
        if getattr(args, name) > 65536:
            problems.append(f'--{name} must be at most 65536, got {getattr(args, name)}')
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
        problems.append('--loss_weights, --class_on, --class_loss and --extractor_only apply to --method acnet only')
    if args.extractor_only and (tuple(args.loss_weights) != DEFAULT_LOSS_WEIGHTS or tuple(args.class_on) != CLASS_INPUTS):
        problems.append('--loss_weights and --class_on weigh the generator\'s losses: --extractor_only has none')
    if args.class_loss == 'triplet' and not args.extractor_only:
        problems.append('--class_loss triplet is the extractor-only baseline of the original (ablation/triplet.py): '
                        'add --extractor_only')
    if args.feature_levels and args.method != 'msedge':
        problems.append('--feature_levels applies to --method msedge only')
    if problems:
        raise UserError('; '.join(problems))
    backbone_tag(args.method, args.backbone_type)  # an unknown name fails here, naming close matches
    check_device(args.device)


def acnet_variant(args):
    """File-name suffix of a non-default ACNet ('' for the original), e.g. _w1-1-1_on-photo-fake or _extractor-triplet."""
    suffix = '_extractor' if args.extractor_only else ''
    if args.class_loss != 'normsoftmax' or args.extractor_only:
        suffix += f'-{args.class_loss}' if args.extractor_only else f'_{args.class_loss}'
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
        prefix += '' if args.edge_mode == 'both' else f'_edge-{args.edge_mode}'
        levels = getattr(args, 'feature_levels', None)
        prefix += f'_levels-{"-".join(map(str, levels))}' if levels and tuple(levels) != default_levels(
            backbone_tag('msedge', args.backbone_type)) else ''
    else:
        prefix += acnet_variant(args)
    return prefix + ('_gzs' if getattr(args, 'gzs', False) else '')  # GZS runs train on fewer images


@dataclass
class RunFiles:
    """A run's files in --save_root (docs/checkpoints.md), and the lock that a running run holds."""
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
