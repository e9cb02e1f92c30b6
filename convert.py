"""Turn the ACNet authors' released checkpoints into one checkpoint of this repo.

    python convert.py --extractor sketchy_resnet50_512_extractor.pth --generator sketchy_resnet50_512_generator.pth \
        --backbone_type resnet50 --emb_dim 512 --save result/sketchy_resnet50_512_model.pth
    python test.py --evaluate --data_base result/sketchy_resnet50_512_model.pth --data_root data --data_name sketchy
    python test.py --data_base result/sketchy_resnet50_512_model.pth --data_root data --data_name sketchy

The ACNet README links one download per row of its table. Each holds the original train.py's state
dicts: {prefix}_extractor.pth (the timm model under `backbone.`) and {prefix}_generator.pth. Our
networks carry the same layer names, so the tensors are copied as they are, after a check of every
name and shape. The discriminator and the loss proxies were not released: the checkpoint holds the
two networks that retrieval needs and can be evaluated and queried, not resumed.
"""
import argparse
from pathlib import Path


from checkpoint import checkpoint_record, read_pth
from cli import ArgumentParser, UserError, run_cli
from config import parse_args as train_args
from model import acnet_from_released
from safe_files import check_writable_dir, save_torch


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--extractor', required=True, help='the released {prefix}_extractor.pth')
    p.add_argument('--generator', required=True, help='the released {prefix}_generator.pth')
    p.add_argument('--backbone_type', default='resnet50', help='resnet50 or vgg16, as in the file names')
    p.add_argument('--emb_dim', type=int, default=512, help='64, 512 or 4096, as in the file names')
    p.add_argument('--save', required=True, help='the checkpoint to write (a *_model.pth of this repo)')
    p.add_argument('--data_root', default='data', help='recorded as the default for test.py')
    p.add_argument('--data_name', default=None, help='recorded as the default for test.py (default: the '
                                                     "file name's first word, e.g. sketchy)")
    p.add_argument('--img_size', type=int, default=224, help='input size the networks were trained at')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --save file')
    return p.parse_args(argv)


def convert(args):
    save = Path(args.save)
    check_writable_dir(save.parent, '--save folder')
    if save.is_dir():
        raise UserError(f"--save '{save}' is a folder: name the checkpoint file to write")
    for option, path in (('--extractor', args.extractor), ('--generator', args.generator)):
        if save.exists() and Path(path).exists() and save.resolve() == Path(path).resolve():
            raise UserError(f"--save '{save}' is the {option} file: converting never replaces a released file; "
                            f"choose another --save (nothing was written)")
    if save.exists() and not args.overwrite:
        raise UserError(f"'{save}' exists: pass --overwrite to replace it, or choose another --save")
    if not 1 <= args.emb_dim <= 65536:
        raise UserError(f'--emb_dim must be from 1 to 65536, got {args.emb_dim}')
    if not 32 <= args.img_size <= 2048 or args.img_size % 4:
        raise UserError(f'--img_size must be a multiple of 4 from 32 to 2048 (as train.py takes), got {args.img_size}')
    data_name = args.data_name or Path(args.extractor).name.split('_')[0]
    extractor, generator = (read_pth(path, 'released checkpoint') for path in (args.extractor, args.generator))
    model = acnet_from_released(extractor, generator, args.backbone_type, args.emb_dim,
                                paths=(args.extractor, args.generator))
    run_args = train_args(['--method', 'acnet', '--backbone_type', args.backbone_type, '--emb_dim', str(args.emb_dim),
                           '--data_root', args.data_root, '--data_name', data_name, '--img_size', str(args.img_size)])
    checkpoint = checkpoint_record(model, run_args, parts=('generator', 'extractor'),
                                   converted_from=[str(args.extractor), str(args.generator)])
    save_torch(checkpoint, save)
    print(f'saved {save}: ACNet {model.backbone_tag}, {args.emb_dim}-d, from {args.extractor} and {args.generator}')
    print(f'next: python test.py --evaluate --data_base {save} --data_root {args.data_root} --data_name {data_name}')
    return checkpoint


def main(argv=None):
    run_cli(convert, parse_args(argv))


if __name__ == '__main__':
    main()
