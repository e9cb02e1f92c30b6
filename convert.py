"""Turn a method's released checkpoints into one checkpoint of this repo (each method names its files: ACNet's and
ClipPrompt's).

    python convert.py --extractor sketchy_resnet50_512_extractor.pth --generator sketchy_resnet50_512_generator.pth \\
        --backbone_type resnet50 --emb_dim 512 --save result/sketchy_resnet50_512_model.pth
    python test.py --evaluate --data_base result/sketchy_resnet50_512_model.pth --data_root data --data_name sketchy
    python test.py --data_base result/sketchy_resnet50_512_model.pth --data_root data --data_name sketchy
    python convert.py --clipprompt sketchy_3_model.pth --save result/sketchy_clipprompt_ViT-B-32_512_model.pth

ACNet: the ACNet README links one download per row of its table. Each holds the original train.py's state
dicts: {prefix}_extractor.pth (the timm model under `backbone.`) and {prefix}_generator.pth. Our
networks carry the same layer names, so the tensors are copied as they are, after a check of every
name and shape. The discriminator and the loss proxies were not released: the checkpoint holds the
two networks that retrieval needs and can be evaluated and queried, not resumed.

ONNX: `convert.py --onnx CKPT` exports a checkpoint's sketch and photo embedders to ONNX beside it (CKPT stem
.sketch.onnx and .photo.onnx), for test.py and search.py --runtime onnx, which otherwise export them on first use
(docs/speed.md#onnx-runtime); graphs of another version of the checkpoint are exported again.

    python convert.py --onnx result/synthetic_acnet_resnet50_512_model.pth

ClipPrompt: its README links {data_name}_{prompt_num}_model.pth, the state dict of its Model (both image towers,
the whole CLIP, both prompts); every tensor is copied to its place here after a check of names and shapes, so the
checkpoint scores what ClipPrompt's own code scores (docs/runs.md).
"""
import argparse
import os
from pathlib import Path

from methods import get_method, method_names
from zs_sbir.checkpoint import checkpoint_record
from zs_sbir.cli import ArgumentParser, UserError, check_numbers, run_cli
from zs_sbir.config import parse_args as train_args
from zs_sbir.retrieval import load_model
from zs_sbir.safe_files import acquire_lock, check_writable_dir, save_torch


def importers():
    """{method name: the options naming its released files} of every method that has releases."""
    found = {}
    for name in method_names():
        scratch = argparse.ArgumentParser(add_help=False)
        get_method(name).add_release_options(scratch)
        if scratch._actions:
            found[name] = [action.dest for action in scratch._actions]
    return found


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in importers():
        get_method(name).add_release_options(p.add_argument_group(f'{name} releases'))
    p.add_argument('--backbone_type', default=None, help="the backbone the files hold, as in their names (default: "
                                                         "the method's)")
    p.add_argument('--emb_dim', type=int, default=None, help="the embedding size the files hold, as in their names "
                                                             "(default: the method's)")
    p.add_argument('--onnx', default=None, metavar='CKPT',
                   help="export a checkpoint of this repo to ONNX beside it (its sketch and photo graphs) and stop")
    p.add_argument('--save', default=None, help='the checkpoint to write (a *_model.pth of this repo)')
    p.add_argument('--data_root', default='data', help='recorded as the default for test.py')
    p.add_argument('--data_name', default=None, help='recorded as the default for test.py (default: the '
                                                     "file name's first word, e.g. sketchy)")
    p.add_argument('--img_size', type=int, default=224, help='input size the networks were trained at')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --save file')
    return p.parse_args(argv)


def release_of(args):
    """(method name, {option: file}) of the released files the arguments name: those of exactly one method."""
    named = {name: {dest: getattr(args, dest) for dest in dests if getattr(args, dest) is not None}
             for name, dests in importers().items()}
    named = {name: files for name, files in named.items() if files}
    if len(named) != 1:
        choices = '; '.join(f'{name}: {" and ".join(f"--{d}" for d in dests)}' for name, dests in importers().items())
        raise UserError(f'name the released files of one method ({choices})')
    return next(iter(named.items()))


def export_onnx(args):
    """--onnx: both graphs of a checkpoint, exported (or checked to be current) beside it."""
    released = [f'--{dest}' for dests in importers().values() for dest in dests if getattr(args, dest) is not None]
    if released or args.save:
        raise UserError(f'--onnx exports a checkpoint of this repo; {", ".join(released + ["--save"] * bool(args.save))} '
                        f'converts a release: run them apart')
    if not args.onnx:
        raise UserError('--onnx must name a checkpoint file')
    folder = Path(args.onnx).resolve().parent
    if not os.access(folder, os.W_OK):  # before any export: convert.py writes the graphs or nothing
        raise UserError(f"cannot write beside '{args.onnx}' (its folder is read-only): copy the checkpoint to a "
                        f"writable folder; test.py and search.py export into memory there")
    model, checkpoint = load_model(args.onnx, 'cpu', 'onnx')
    paths = model.prepare()
    if None in paths:
        raise UserError(f"could not write the graphs beside '{args.onnx}' (said above): free space there, or copy the "
                        f"checkpoint to a folder that can be written")
    for path in paths:
        print(f'{path}: current ({checkpoint["method"]} {checkpoint.get("backbone_tag")}, '
              f'{checkpoint["args"]["img_size"]} px, any batch size)')
    return paths


def convert(args):
    if args.onnx is not None:
        return export_onnx(args)
    if not args.save:
        raise UserError('name the checkpoint to write with --save (or export one to ONNX with --onnx CKPT)')
    method, files = release_of(args)
    save = Path(args.save)
    check_writable_dir(save.parent, '--save folder')
    if save.is_dir():
        raise UserError(f"--save '{save}' is a folder: name the checkpoint file to write")
    for dest, path in files.items():
        if save.exists() and Path(path).exists() and save.resolve() == Path(path).resolve():
            raise UserError(f"--save '{save}' is the --{dest} file: converting never replaces a released file; "
                            f"choose another --save (nothing was written)")
    if save.exists() and not args.overwrite:  # said at once; checked again under the lock before the write
        raise UserError(f"'{save}' exists: pass --overwrite to replace it, or choose another --save")
    check_numbers(args)
    data_name = args.data_name or Path(next(iter(files.values()))).name.split('_')[0]
    model, options, parts = get_method(method).from_release(args)
    run_args = train_args(['--method', method, '--data_root', args.data_root, '--data_name', data_name, '--img_size',
                           str(args.img_size), *options])
    checkpoint = checkpoint_record(model, run_args, parts=parts, converted_from=[str(path) for path in files.values()])
    release = acquire_lock(save.parent / f'.{save.name}.lock', f"'{save}'", hint='wait for it, or choose another --save')
    try:  # from the check to the write, no other convert.py writes this file
        if save.exists() and not args.overwrite:
            raise UserError(f"'{save}' exists: pass --overwrite to replace it, or choose another --save")
        save_torch(checkpoint, save)
    finally:
        release()
    print(f'saved {save}: {method} {model.backbone_tag}, {run_args.emb_dim}-d, from {" and ".join(map(str, files.values()))}')
    print(f'next: python test.py --evaluate --data_base {save} --data_root {args.data_root} --data_name {data_name}')
    return checkpoint


def main(argv=None):
    run_cli(convert, parse_args(argv))


if __name__ == '__main__':
    main()
