"""Command lines: the errors a user can fix, the argument parser every script uses, and run_cli, which
turns any of those errors into one line on stderr and exit code 2 (never a traceback)."""
import argparse
import os
import sys

import torch


class UserError(Exception):
    """A problem a user can fix (data, options, files): scripts print it as one line and exit 2."""


class DataError(UserError):
    """A problem with the dataset folders or an image file."""


def first_line(error):
    """The first line of an exception's message (at most 200 characters), or its type's name."""
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


# The defaults every script shares for the same concept, and the most data-loader processes any of them starts
# (each one holds a copy of the loader: thousands of them take a machine down).
DEFAULT_WORKERS, MAX_WORKERS = min(8, os.cpu_count() or 1), 64


def check_workers(workers, minimum=0, option='--workers'):
    if not minimum <= workers <= MAX_WORKERS:
        raise UserError(f'{option} must be from {minimum} to {MAX_WORKERS}, got {workers}')


def default_device():
    return 'cuda' if torch.cuda.is_available() else 'cpu'


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr (no usage block), exit code 2; and `renamed`, {old
    spelling: new spelling or [new spelling, value]}, keeps renamed options working without showing them."""

    def __init__(self, *args, renamed=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.renamed = dict(renamed or {})

    def parse_known_args(self, args=None, namespace=None):
        args, spelled = list(sys.argv[1:] if args is None else args), []
        for i, arg in enumerate(args):
            if arg == '--':  # what follows belongs to another program
                spelled += args[i:]
                break
            name, equals, value = arg.partition('=')
            new = self.renamed.get(name, arg)
            new = [new] if isinstance(new, str) else list(new)
            spelled += [f'{new[0]}={value}', *new[1:]] if equals and name in self.renamed else new
        return super().parse_known_args(spelled, namespace)

    def error(self, message):
        print(f'error: {message} (see {self.prog} --help)', file=sys.stderr)
        sys.exit(2)


def one_line(error):
    """The message of a UserError; one raised in a DataLoader worker arrives wrapped in a traceback."""
    text = str(error).strip()
    if 'Original Traceback' in text:
        text = text.splitlines()[-1].split(': ', 1)[-1]
    return ' '.join(text.split('\n'))


def run_cli(command, args, interrupted=None):
    """Run command(args): a UserError becomes one line on stderr and exit code 2, and so do running out of
    GPU memory and a data-loader worker killed (what the out-of-memory killer does); Ctrl-C exits 130 after
    printing `interrupted()` (what was kept), if given."""
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 prints escaped, not as a traceback
        if hasattr(stream, 'reconfigure'):
            stream.reconfigure(errors='backslashreplace')
    try:
        return command(args)
    except UserError as error:
        fail(one_line(error))
    except torch.OutOfMemoryError as error:
        fail(f'out of GPU memory{batch_sizes(args)}, or add --amp ({first_line(error)[:120]})')
    except RuntimeError as error:
        if 'DataLoader worker' not in str(error) or not any(w in str(error) for w in ('killed', 'exited unexpectedly')):
            raise
        fail(f'a data loader process was killed ({first_line(error)}), most likely for lack of memory: lower '
             f'--workers or --batch_size')
    except KeyboardInterrupt:
        print(f'\ninterrupted{": " + interrupted() if interrupted else ""}', file=sys.stderr)
        sys.exit(130)


def batch_sizes(args):
    size, eval_size = getattr(args, 'batch_size', None), getattr(args, 'eval_batch_size', None)
    if size is None:
        return ': lower --batch_size'
    return f' at --batch_size {size}' + (f' (--eval_batch_size {eval_size}): lower them' if eval_size else ': lower it')


def fail(message):
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def check_device(device, option='--device'):
    """A device that torch can use here, or a UserError naming `option` and saying what this machine has."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise UserError(f"{option} {device!r} is not a device name (use cpu, cuda or cuda:N)") from error
    if parsed.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise UserError(f'{option} {device}: no CUDA GPU is visible here; use {option} cpu')
        if parsed.index is not None and parsed.index >= count:
            raise UserError(f'{option} {device}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}')
    elif parsed.type != 'cpu':
        raise UserError(f'{option} {device}: only cpu and cuda devices are supported')
    return parsed


# ----------------------------------------------------------------------------------------------
# Every numeric option of every command, checked in one place: range, size, overflow and finiteness

class Limit:
    """The values an option takes: from `low` to `high` (`low` itself excluded with open_low), a multiple of
    `multiple`, always a finite number."""

    def __init__(self, low=None, high=None, multiple=None, open_low=False):
        self.low, self.high, self.multiple, self.open_low = low, high, multiple, open_low

    def allows(self, value):
        if value != value or value in (float('inf'), float('-inf')):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        if self.high is not None and value > self.high:
            return False
        return not self.multiple or value % self.multiple == 0

    def __str__(self):
        if self.open_low and self.high is None:
            return 'a positive number' if self.low == 0 else f'above {self.low}'
        span = (f'from {self.low} to {self.high}' if self.high is not None else f'at least {self.low}')
        return f'a multiple of {self.multiple} {span}' if self.multiple else span


INT32 = 2 ** 31 - 1
# The same concept has the same limit in every command (a command may narrow one, e.g. search.py serve's --num).
LIMITS = {
    'img_size': Limit(32, 2048, 4), 'batch_size': Limit(1, 65536), 'eval_batch_size': Limit(1, 65536),
    'emb_dim': Limit(1, 65536), 'emb_dims': Limit(1, 65536), 'epochs': Limit(1, 100_000), 'warmup': Limit(0, 100_000),
    'workers': Limit(0, MAX_WORKERS), 'seed': Limit(0, INT32), 'seeds': Limit(0, INT32), 'data_seed': Limit(0, INT32),
    'eval_queries': Limit(0, 10 ** 9), 'lr': Limit(0, open_low=True), 'num': Limit(1, 10_000),
    'nprobe': Limit(1, INT32), 'ef_search': Limit(1, INT32), 'save_every': Limit(0), 'port': Limit(1, 65535),
    'max_points': Limit(10, 10 ** 7), 'limit': Limit(1, 10 ** 6), 'columns': Limit(1, 100), 'steps': Limit(1, 10 ** 6),
    'repeats': Limit(1, 1000), 'slow_queries': Limit(1, 10 ** 7), 'queries': Limit(1, 10 ** 7),
    'embed_images': Limit(1, 10 ** 7), 'clusters': Limit(1, 10 ** 7), 'sizes': Limit(1000, 10 ** 8),
}


def number_problems(args, **narrower):
    """What is wrong with the numeric options of a command's arguments (LIMITS, with `narrower` limits of its own),
    in words ([] when nothing is)."""
    problems = []
    for name, value in vars(args).items():
        limit = narrower.get(name, LIMITS.get(name))
        if limit is None or value is None or isinstance(value, bool):
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, (int, float)) and not limit.allows(item):
                problems.append(f'--{name} must be {limit}, got {item}')
    return problems


def check_numbers(args, **narrower):
    """A UserError naming every numeric option out of its limits (see number_problems)."""
    problems = number_problems(args, **narrower)
    if problems:
        raise UserError('; '.join(problems))
