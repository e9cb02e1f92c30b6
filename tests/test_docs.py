"""README.md and docs/ never drift from the code: every shell command they show is parsed by its script's own
argument parser (and the ones that run offline in seconds are run), every file they link exists, and one
concept has one option name and one default across every script (old spellings still work, unseen)."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from methods import registry
from zs_sbir import config
import convert
import plot
import prepare
import reproduce
import search
import speed
import test as retrieval
from zs_sbir.cli import DEFAULT_WORKERS
from helpers import ROOT
import clipprompt_side_by_side

PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
PARSERS = {'tests/clipprompt_side_by_side.py': clipprompt_side_by_side.parse_args, 'train.py': config.parse_args, 'test.py': retrieval.parse_args, 'search.py': search.parse_args,
           'plot.py': plot.parse_args, 'prepare.py': prepare.parse_args, 'convert.py': convert.parse_args,
           'speed.py': speed.parse_args, 'bench.py': speed.parse_args, 'reproduce.py': reproduce.parse_args,
           'benchmark.py': reproduce.parse_args}


def shell_blocks(page):
    return re.findall(r'```bash\n(.*?)```', page.read_text(), flags=re.S)


def commands(block):
    """The simple commands of a bash block: continuations joined, comments dropped, `for` loops unrolled."""
    text = re.sub(r'\\\n\s*', ' ', block)
    lines = [line.split(' #')[0].strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith('#')]
    out, i = [], 0
    while i < len(lines):
        loop = re.fullmatch(r'for (\w+) in (.*?); do(.*)', lines[i])
        if loop:
            body, i = [loop.group(3).strip()] if loop.group(3).strip() else [], i + 1
            while not lines[i].startswith('done'):
                body.append(lines[i])
                i += 1
            for value in loop.group(2).split():
                out += [line.replace(f'${loop.group(1)}', value).replace(f'${{{loop.group(1)}}}', value)
                        for line in body]
        else:
            out.append(lines[i])
        i += 1
    return [part.strip() for line in out for part in re.split(r'&&|;', line) if part.strip()]


def script_call(command):
    """(script, its arguments) when a command runs one of the repo's scripts, else None."""
    words = shlex.split(command)
    while words and re.fullmatch(r'[A-Z_]+=\S*', words[0]):  # environment assignments
        words = words[1:]
    if words and words[0] == 'torchrun':
        words = ['python'] + [w for w in words[1:] if not w.startswith('--nproc')]
    if len(words) > 1 and Path(words[0]).name in ('python', 'python3') and words[1] in PARSERS:
        return words[1], words[2:]
    return None


def inline_commands(page):
    """Commands quoted inline (`python train.py --gzs`), less those with a placeholder (<...>, ...)."""
    return [c for c in re.findall(r'`((?:python|\.venv/bin/python) \w+\.py[^`]*)`', page.read_text())
            if '<' not in c and '...' not in c]


ALL = [(page.name, command) for page in PAGES for block in shell_blocks(page) for command in commands(block)] + \
    [(page.name, command) for page in PAGES for command in inline_commands(page)]


def test_the_pages_show_commands():
    assert len(ALL) > 50 and {page.name for page in PAGES} >= {'README.md', 'data.md', 'search.md'}


def register_examples(page_name, monkeypatch):
    """Run the python blocks of a page that register a method (docs/methods.md's toy) into a copy of the registry,
    so that its commands parse as they would with the method's file in methods/."""
    blocks = [b for b in re.findall(r'```python\n(.*?)```', (ROOT / 'docs' / page_name).read_text(), flags=re.S)
              if '@register_method' in b] if (ROOT / 'docs' / page_name).is_file() else []
    if blocks:
        monkeypatch.setattr(registry, '_REGISTRY', dict(registry._REGISTRY))
        for block in blocks:
            exec(compile(block, page_name, 'exec'), {'__name__': f'docs.{page_name}'})
    return len(blocks)


def test_the_worked_example_registers_its_method(monkeypatch):
    assert register_examples('methods.md', monkeypatch) == 1 and 'toy' in registry.method_names()


@pytest.mark.parametrize('page, command', ALL, ids=[f'{p}:{c[:60]}' for p, c in ALL])
def test_every_command_parses_with_its_scripts_own_parser(page, command, monkeypatch):
    register_examples(page, monkeypatch)
    call = script_call(command)
    if call is None:  # not one of the repo's scripts: its own checks below
        words = shlex.split(command)
        if words[0] in ('tests/run', '.ci/gpu', '.ci/run'):
            assert (ROOT / words[0]).is_file(), command
        elif 'pytest' in words:
            assert all((ROOT / w.split('::')[0]).exists() for w in words if w.startswith('tests/')), command
        else:
            assert words[0] in ('python3', 'python3.12', 'cd', 'git', 'grep', 'pip', 'mkdir', 'ls', 'export') or \
                words[0].endswith('/pip'), f'{page}: unknown command {command!r}'
        return
    script, argv = call
    argv = [arg for arg in argv if '$' not in arg]  # a shell variable stands for a value it was given
    try:
        PARSERS[script](argv)
    except SystemExit as stop:
        pytest.fail(f'{page}: `{command}` does not parse (exit {stop.code})')


def test_every_linked_file_exists():
    for page in PAGES:
        for target in re.findall(r'\]\(([^)#:]+)(?:#[^)]*)?\)', page.read_text()):
            assert (page.parent / target).exists(), f'{page.name} links to a missing {target}'


def test_readme_is_a_front_page():
    text = (ROOT / 'README.md').read_text()
    assert len(text.encode()) < 20_000
    assert text.index('## Results') < len(text) / 3
    quick = text[text.index('## Quick start'):text.index('## Results')]
    assert all(len(line) <= 110 for line in shell_blocks_text(quick))


def shell_blocks_text(text):
    return [line for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S) for line in block.splitlines()]


def test_the_quick_start_runs_word_for_word_as_ci_does():
    text = (ROOT / 'README.md').read_text()
    quick = commands(re.findall(r'```bash\n(.*?)```', text[text.index('## Quick start'):], flags=re.S)[0])
    assert quick[-1] == 'tests/run' and (ROOT / '.ci/run').read_text().strip().endswith('tests/run')
    assert any('train.py --data_name synthetic' in ' '.join(c.split()) for c in quick)


def test_a_dry_run_prints_the_grid_without_data(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / 'reproduce.py'), '--datasets', 'sketchy', 'tuberlin', '--dry_run',
                          '--save_root', str(tmp_path), '--', '--data_root', str(tmp_path / 'nowhere')],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    planned = [line for line in out.stdout.splitlines() if 'train.py' in line]  # each method's paper table
    assert len(planned) == 2 * 2 * 3 * 2 + 2 and sum('--method clipprompt --backbone_type ViT-B-32 --emb_dim 512' in
                                                   line for line in planned) == 2
    assert "note: no dataset folder" in out.stdout


# ----------------------------------------------------------------------------------------------- one name each

def help_text(parse, argv):
    try:
        parse([*argv, '--help'])
    except SystemExit:
        pass


@pytest.mark.parametrize('parse, argv, new, old, value', [
    (search.parse_args, ['query', '--index', 'i'], 'query_name', ['--query', 's.png'], ['s.png']),
    (plot.parse_args, ['generated', '--data_base', 'm.pth'], 'query_name', ['--sketches', 'd'], 'd'),
    (plot.parse_args, ['attention', '--data_base', 'm.pth'], 'query_name', ['--images', 'd'], 'd'),
    (speed.parse_args, ['search'], 'approx', ['--kinds', 'ivf'], ['ivf']),
    (speed.parse_args, ['search'], 'emb_dim', ['--dim', '64'], 64),
    (speed.parse_args, ['train'], 'device', ['--cpu'], 'cpu'),
    (speed.parse_args, ['backbones'], 'device', ['--cpu'], 'cpu'),
    (prepare.parse_args, ['synthetic'], 'data_seed', ['--seed', '3'], 3),
])
def test_one_name_per_concept_and_the_old_spelling_still_works(parse, argv, new, old, value, capsys):
    assert getattr(parse([*argv, *old]), new) == value
    help_text(parse, argv)
    shown = capsys.readouterr().out
    assert f'--{new}' in shown and not re.search(rf'{re.escape(old[0])}\b', shown)
    assert hasattr(retrieval.parse_args([]), 'query_name') and config.parse_args(['--proj_dim', '8']).emb_dim == 8


def test_one_default_per_concept():
    cases = {'workers': [config.parse_args([]), retrieval.parse_args([]),
                         search.parse_args(['index', '--data_base', 'm', '--photos', 'p', '--index', 'i']),
                         prepare.parse_args(['synthetic']), prepare.parse_args(['cache']),
                         speed.parse_args(['train']), speed.parse_args(['search'])],
             'seed': [config.parse_args([]), plot.parse_args(['tsne', '--data_base', 'm'])]}
    assert {args.workers for args in cases['workers']} == {DEFAULT_WORKERS}
    assert {args.seed for args in cases['seed']} == {1}
    devices = [config.parse_args([]), retrieval.parse_args([]), speed.parse_args(['train']),
               plot.parse_args(['attention', '--data_base', 'm', '--query_name', 'd']),
               search.parse_args(['serve', '--index', 'i'])]
    assert len({args.device for args in devices}) == 1


@pytest.mark.parametrize('argv, expected', [
    (['train'], dict(img_size=224, batch_size=64, steps=20)),
    (['train', '--quick'], dict(img_size=32, batch_size=8, steps=3)),
    (['train', '--quick', '--img_size', '64'], dict(img_size=64, batch_size=8, steps=3)),
    (['backbones', '--steps', '5', '--quick'], dict(img_size=64, batch_size=8, steps=5)),
    (['search', '--quick', '--sizes', '5000'], dict(sizes=[5000], embed_images=16, img_size=64)),
    (['search'], dict(sizes=[10_000, 100_000, 1_000_000], embed_images=128, img_size=224)),
    (['metrics', '--quick'], dict(sizes=['quick'])),
    (['metrics', '--quick', '--sizes', 'tuberlin'], dict(sizes=['tuberlin'])),
])
def test_speed_quick_sizes_yield_to_the_options_given(argv, expected):
    args = speed.parse_args(argv)
    assert {name: getattr(args, name) for name in expected} == expected


def gpu_check_commands(*stages):
    out = subprocess.run(['bash', str(ROOT / '.ci/gpu'), *stages], capture_output=True, text=True, cwd=ROOT,
                         env={'PATH': '/usr/bin:/bin', 'GPU_CHECK_DRY': '1', 'OUT': '/tmp/zs-sbir-gpu-dry',
                              'PY': sys.executable}, check=True)
    return [line for line in out.stdout.splitlines() if line.startswith(sys.executable)]


def test_every_command_of_the_gpu_check_parses():
    """A GPU session has minutes of device time: a renamed option must fail here, not there."""
    lines = gpu_check_commands('wheels') + gpu_check_commands()  # wheels here, then every stage on the GPU
    scripts = []
    for line in lines:
        words = shlex.split(line)[1:]
        if words[:2] == ['-m', 'torch.distributed.run']:
            words = words[2:]
            while words[0].startswith('--'):  # the launcher's options
                words = words[1:] if words[0] == '--standalone' else words[2:]
        if words and words[0].endswith('.py'):
            scripts.append(words[0])
            try:
                args = PARSERS[words[0]](words[1:])
            except SystemExit as stop:
                pytest.fail(f'.ci/gpu: `{line}` does not parse (exit {stop.code})')
            if words[0] == 'train.py':
                config.check_args(args)  # e.g. --warmup beyond --epochs
    assert scripts.count('train.py') == 4 and {'speed.py', 'prepare.py'} <= set(scripts)
    pytest_line = next(shlex.split(line) for line in lines if '-m pytest' in line)
    tested = [w for w in pytest_line if w.startswith('tests/')]
    naming_a_device = {f'tests/{p.name}' for p in (ROOT / 'tests').glob('test_*.py') if
                       re.search(r'\bDEVICE\b', p.read_text())}
    assert set(tested) == naming_a_device | {'tests/test_reliability.py'} and len(tested) > 10
    download = next(shlex.split(line) for line in lines if ' pip download ' in line)
    pins = dict(line.lower().split('==') for line in (ROOT / 'requirements.txt').read_text().split())
    carried = {w.split('==')[0]: w.split('==')[1] for w in download if '==' in w}
    assert all(pins[name] == version for name, version in carried.items() if name in pins) and \
        {'kornia', 'pytorch-metric-learning', 'timm', 'faiss-cpu', 'open-clip-torch', 'ftfy'} <= set(carried)
    assert pytest_line[pytest_line.index('-m', 2) + 1] == 'not web'
