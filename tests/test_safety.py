"""Bad input and accidents, command by command: each ends in one line naming the culprit, exit code 2 and
no traceback, and leaves every file the user already had byte-identical (README "Bad inputs")."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import reproduce
import convert
import prepare
import test as retrieval
import train as train_module
from zs_sbir import training
from helpers import DEVICE, ROOT, check_cli, digests, fake_run, tiny
from zs_sbir.image_cache import build_cache
from zs_sbir.config import parse_args
from train import main as train_main, train
from zs_sbir.checkpoint import CHECKPOINT_FORMAT, VECTORS_FORMAT, load_torch
from zs_sbir.safe_files import read_csv, save_torch

PREFIX = 'synthetic_acnet_resnet50_8'


@pytest.fixture(scope='module')
def run(tiny_data, tmp_path_factory):
    """A finished 2-epoch ACNet run: its folder."""
    out = tmp_path_factory.mktemp('run')
    train(parse_args(tiny(tiny_data, out, '--epochs', '2')))
    return out


def copy_run(run, tmp_path):
    shutil.copytree(run, tmp_path / 'run')
    return tmp_path / 'run'


# ----------------------------------------------------------------------------------------------- train.py

def test_a_second_run_into_the_same_files_is_refused_and_a_killed_run_does_not_block(tiny_data, tmp_path, capsys):
    """Two train.py at once: the second stops; after kill -9 of the first, --resume takes over its lock."""
    out = tmp_path / 'out'
    first = subprocess.Popen([sys.executable, str(ROOT / 'train.py'), *tiny(tiny_data, out, '--epochs', '200')],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / f'{PREFIX}_last.pth').exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (out / f'.{PREFIX}.lock').exists() and first.poll() is None
        check_cli(capsys, train_main, tiny(tiny_data, out, '--epochs', '200', '--resume'),
                  rf"run '{PREFIX}' in '.*out' is being written by another process \(pid {first.pid} on ")
        check_cli(capsys, train_main, tiny(tiny_data, out, '--epochs', '200', '--overwrite'),
                  'is being written by another process')
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / f'.{PREFIX}.lock').exists()  # left behind by the killed run
    epochs = load_torch(out / f'{PREFIX}_last.pth', CHECKPOINT_FORMAT, 'checkpoint')['epoch']
    train(parse_args(tiny(tiny_data, out, '--epochs', str(epochs + 1), '--resume')))
    assert len(read_csv(out / f'{PREFIX}_results.csv')) == epochs + 1
    assert not [p for p in out.iterdir() if p.name.startswith('.')]  # lock released, no temporaries


def test_resume_refuses_other_data(run, tiny_data, tmp_path, capsys):
    out = copy_run(run, tmp_path)
    renamed = tmp_path / 'renamed'
    shutil.copytree(tiny_data, renamed)
    for side in ('sketch', 'photo'):
        first = sorted((renamed / 'synthetic' / 'train' / side).iterdir())[0]
        first.rename(first.with_name('zz_renamed'))
    check_cli(capsys, train_main, tiny(renamed, out, '--epochs', '3', '--resume'),
              r"cannot resume .*: the data at '.*renamed/synthetic' is not the run's \(train split: classes 1 gone "
              r"\(e\.g\. '.*'\), 1 new \(e\.g\. 'zz_renamed'\)\); pass the run's --data_root", unchanged=[out])
    fewer = tmp_path / 'fewer'
    shutil.copytree(tiny_data, fewer)
    for side in ('sketch', 'photo'):
        shutil.rmtree(sorted((fewer / 'synthetic' / 'train' / side).iterdir())[0])
    check_cli(capsys, train_main, tiny(fewer, out, '--epochs', '3', '--resume'),
              r'train split: classes 1 gone .*, 0 new; 16 -> 12 sketches; 16 -> 12 photos', unchanged=[out])
    one_less = tmp_path / 'one_less'
    shutil.copytree(tiny_data, one_less)
    sorted((one_less / 'synthetic' / 'val' / 'photo').rglob('*.jpg'))[0].unlink()
    check_cli(capsys, train_main, tiny(one_less, out, '--epochs', '3', '--resume'), r'val split: 12 -> 11 photos',
              unchanged=[out])


def test_resume_epoch_counts(run, tiny_data, tmp_path, capsys):
    out = copy_run(run, tmp_path)
    check_cli(capsys, train_main, tiny(tiny_data, out, '--epochs', '1', '--resume'),
              r"_last.pth' has 2 epochs, more than --epochs 1: pass --epochs 2 or more", unchanged=[out])
    before = digests(out)
    train(parse_args(tiny(tiny_data, out, '--epochs', '2', '--resume')))
    assert 'already has all 2 epochs: nothing to do' in capsys.readouterr().out and digests(out) == before


def test_resume_of_a_run_older_than_an_option_takes_its_default(run, tiny_data, tmp_path, capsys):
    # a _last.pth written before --eval_queries existed has no such key: it ran with the default (all)
    out = copy_run(run, tmp_path)
    last = load_torch(out / f'{PREFIX}_last.pth', CHECKPOINT_FORMAT, 'checkpoint')
    del last['args']['eval_queries']
    save_torch(last, out / f'{PREFIX}_last.pth')
    check_cli(capsys, train_main, tiny(tiny_data, out, '--epochs', '3', '--resume', '--eval_queries', '3'),
              r'cannot resume .* with different run options: --eval_queries 0 -> 3', unchanged=[out])
    train(parse_args(tiny(tiny_data, out, '--epochs', '3', '--resume')))
    assert [row['epoch'] for row in read_csv(out / f'{PREFIX}_results.csv')] == ['1', '2', '3']


def test_a_full_disk_while_saving_changes_nothing_and_resume_continues(tiny_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'out'
    train(parse_args(tiny(tiny_data, out, '--epochs', '1')))
    before = digests(out)

    def full_disk_csv(rows):  # epoch 2's _last.pth is written in full first, then the CSV hits a full disk
        def write(path):
            Path(path).write_text('epoch,adv_lo')
            raise OSError(errno.ENOSPC, 'No space left on device')
        return write
    monkeypatch.setattr(train_module, 'csv_writer', full_disk_csv)
    check_cli(capsys, train_main, tiny(tiny_data, out, '--epochs', '2', '--resume'),
              r"could not write '.*_results.csv' \(No space left on device; \d+ MB free there\): the files being "
              r"saved were left as they were")
    assert digests(out) == before  # epoch 1's files intact, no temporary file left
    monkeypatch.undo()
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):  # torch.save reports a full disk as a RuntimeError
        raise RuntimeError('[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: file write failed')
    monkeypatch.setattr(torch, 'save', failing_save)
    check_cli(capsys, train_main, tiny(tiny_data, out, '--epochs', '2', '--resume'),
              r"could not write '.*_last.pth' \(\[enforce fail.*file write failed; \d+ MB free there\)")
    assert digests(out) == before
    monkeypatch.setattr(torch, 'save', real_save)
    train(parse_args(tiny(tiny_data, out, '--epochs', '2', '--resume')))
    assert len(read_csv(out / f'{PREFIX}_results.csv')) == 2


def test_best_files_cut_off_by_a_kill_are_rebuilt_on_resume(run, tiny_data, tmp_path, capsys):
    """Killed between the renames of a save: _last.pth names epoch 2 best, the best files are of epoch 1."""
    out = copy_run(run, tmp_path)
    last = load_torch(out / f'{PREFIX}_last.pth', CHECKPOINT_FORMAT, 'checkpoint')
    last['best'] = {**last['best'], 'epoch': 2}
    save_torch(last, out / f'{PREFIX}_last.pth')
    for name, fmt in (('model', CHECKPOINT_FORMAT), ('vectors', VECTORS_FORMAT)):
        stale = load_torch(out / f'{PREFIX}_{name}.pth', fmt, name)
        save_torch({**stale, 'epoch': 1}, out / f'{PREFIX}_{name}.pth')
    (out / f'.{PREFIX}_model.pth.x1y2.tmp').write_bytes(b'half a checkpoint')  # what kill -9 leaves
    train(parse_args(tiny(tiny_data, out, '--epochs', '2', '--resume')))
    assert 'rewriting the best-epoch files of epoch 2' in capsys.readouterr().out
    model = load_torch(out / f'{PREFIX}_model.pth', CHECKPOINT_FORMAT, 'checkpoint')
    vectors = load_torch(out / f'{PREFIX}_vectors.pth', VECTORS_FORMAT, 'vectors')
    assert model['epoch'] == vectors['epoch'] == 2 and vectors['run_id'] == last['run_id']
    assert all(torch.equal(model['model'][k], last['model'][k]) for k in last['model'])
    assert not [p for p in out.iterdir() if p.name.startswith('.')]
    retrieval.main(['--data_base', str(out / f'{PREFIX}_model.pth'), '--save_root', str(tmp_path / 'pictures'),
                    '--device', DEVICE])  # the rebuilt pair is accepted


def test_msedge_trains_when_the_last_batch_holds_one_image(tiny_data, tmp_path):
    """32 train images, batch 31: the last batch would hold one image, on which BatchNorm cannot train."""
    train(parse_args(tiny(tiny_data, tmp_path, '--method', 'msedge', '--batch_size', '31', '--epochs', '1',
                          '--warmup', '0')))
    assert len(read_csv(tmp_path / 'synthetic_msedge_resnet50_8_results.csv')) == 1


def test_a_failed_run_leaves_no_save_root(tiny_data, tmp_path, capsys, monkeypatch):
    check_cli(capsys, train_main, tiny(tmp_path / 'no-data', tmp_path / 'out1', '--data_name', 'toy'), 'data root not found')
    assert not (tmp_path / 'out1').exists()

    def fail(*args, **kwargs):
        raise training.NonFiniteLoss('epoch 1/1: a loss became NaN or infinite by step 1')
    monkeypatch.setattr(train_module, 'train_epoch', fail)
    check_cli(capsys, train_main, tiny(tiny_data, tmp_path / 'out2', '--epochs', '1'), 'became NaN')
    assert not (tmp_path / 'out2').exists()


def test_overwrite_drops_an_earlier_runs_bad_image_list(tiny_data, tmp_path):
    broken = tmp_path / 'broken'
    shutil.copytree(tiny_data, broken)
    photo = sorted((broken / 'synthetic' / 'val' / 'photo').rglob('*.jpg'))[0]
    good = photo.read_bytes()
    photo.write_bytes(b'junk')
    train(parse_args(tiny(broken, tmp_path / 'out', '--epochs', '1', '--skip_bad_images')))
    assert (tmp_path / 'out' / f'{PREFIX}_bad_images.txt').read_text().strip() == str(photo)
    photo.write_bytes(good)
    train(parse_args(tiny(broken, tmp_path / 'out', '--epochs', '1', '--skip_bad_images', '--overwrite')))
    assert not (tmp_path / 'out' / f'{PREFIX}_bad_images.txt').exists()


def test_links_to_missing_files_stop_training_or_are_skipped(tiny_data, tmp_path, capsys):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    (sorted((data / 'synthetic' / 'val' / 'photo').iterdir())[0] / 'gone.jpg').symlink_to(tmp_path / 'moved.jpg')
    check_cli(capsys, train_main, tiny(data, tmp_path / 'out', '--epochs', '1'),
              r"1 files in .* are links to files that no longer exist, e\.g\. '.*gone\.jpg' -> '.*moved\.jpg'")
    train(parse_args(tiny(data, tmp_path / 'out', '--epochs', '1', '--skip_bad_images')))
    listed = (tmp_path / 'out' / f'{PREFIX}_bad_images.txt').read_text()
    assert 'gone.jpg' in listed


def test_a_run_with_skipped_images_works_in_test_py(tiny_data, tmp_path, capsys):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    sorted((data / 'synthetic' / 'val' / 'photo').rglob('*.jpg'))[0].write_bytes(b'junk')
    train(parse_args(tiny(data, tmp_path / 'out', '--epochs', '1', '--skip_bad_images')))
    checkpoint = tmp_path / 'out' / f'{PREFIX}_model.pth'
    retrieval.main(['--data_base', str(checkpoint), '--save_root', str(tmp_path / 'pictures'), '--device', DEVICE])
    metrics = retrieval.main(['--data_base', str(checkpoint), '--evaluate', '--workers', '0', '--device', DEVICE])
    assert 'leaving out the 1 val images that training left out' in capsys.readouterr().out
    best = max(read_csv(tmp_path / 'out' / f'{PREFIX}_results.csv'), key=lambda r: float(r['precise']))
    assert metrics['precise'] == pytest.approx(float(best['precise']), abs=1e-6)


def test_a_stale_image_cache_is_refused(tiny_data, tmp_path, capsys):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    build_cache(data, 'synthetic', 32, 'bilinear', workers=1)
    photo = sorted((data / 'synthetic' / 'train' / 'photo').rglob('*.jpg'))[0]
    Image.new('RGB', (32, 32), (255, 0, 0)).save(photo, quality=50)  # same name, new content
    os.utime(photo, ns=(time.time_ns(), time.time_ns() + 10 ** 9))
    check_cli(capsys, train_main, tiny(data, tmp_path / 'out', '--epochs', '1', '--cache'),
              r"image cache '.*train_32_bilinear.npy' is stale: 1 images changed since it was built \(size or "
              r"modification time\), e\.g\. 'photo/.*\.jpg': rebuild it with `python prepare.py cache")


@pytest.mark.parametrize('extra, message', [
    (['--device', 'cuda:7'], r'--device cuda:7: no CUDA GPU is visible here|--device cuda:7: this machine has'),
    (['--device', 'tpu0'], r"--device 'tpu0' is not a device name"),
    (['--epochs', 'ten'], r"argument --epochs: invalid int value: 'ten' \(see .* --help\)"),
    (['--method', 'acnett'], r"argument --method: invalid choice: 'acnett'"),
])
def test_option_errors_are_one_line(tiny_data, tmp_path, capsys, extra, message):
    check_cli(capsys, train_main, tiny(tiny_data, tmp_path / 'out', *extra), message)
    assert not (tmp_path / 'out').exists()


def test_a_data_root_that_is_a_file(tmp_path, capsys):
    (tmp_path / 'data.zip').write_bytes(b'PK')
    check_cli(capsys, train_main, tiny(tmp_path / 'data.zip', tmp_path / 'out'), r"data.root '.*data.zip' is a file, not a folder")


def test_out_of_gpu_memory_names_the_batch_size(tiny_data, tmp_path, capsys, monkeypatch):
    def oom(args):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')
    monkeypatch.setattr(train_module, 'train', oom)
    check_cli(capsys, train_main, tiny(tiny_data, tmp_path, '--batch_size', '4096'),
              r'out of GPU memory at --batch_size 4096 \(--eval_batch_size 8192\): lower them, or add --amp')


# ----------------------------------------------------------------------------------------------- test.py

def test_test_py_never_deletes_or_overwrites_what_it_did_not_write(run, tiny_data, tmp_path, capsys):
    checkpoint = run / f'{PREFIX}_model.pth'
    results = tmp_path / 'result'
    (results / 'benchmark').mkdir(parents=True)
    (results / 'benchmark' / 'benchmark.md').write_text('a table')  # benchmark.py's folder
    query = tmp_path / 'benchmark.png'
    shutil.copy(sorted((tiny_data / 'synthetic' / 'val' / 'sketch').rglob('*.png'))[0], query)
    check_cli(capsys, retrieval.main, ['--data_base', checkpoint, '--query_name', query, '--save_root', results],
              r"folder '.*result/benchmark' exists and was not written by this repo: choose another --save_root "
              r"\(nothing was written\)", unchanged=[results])
    assert not (results / 'benchmark.png').exists()
    (results / 'benchmark').rename(results / 'other')
    (results / 'benchmark.png').write_bytes(b'my own picture')
    check_cli(capsys, retrieval.main, ['--data_base', checkpoint, '--query_name', query, '--save_root', results],
              r"file '.*result/benchmark.png' exists and was not written by this repo", unchanged=[results])
    # a query inside --save_root
    mine = results / 'my_sketch.png'
    shutil.copy(query, mine)
    check_cli(capsys, retrieval.main, ['--data_base', checkpoint, '--query_name', mine, '--save_root', results],
              r"'.*result/my_sketch.png' is \(or holds\) a query image, which would be overwritten", unchanged=[results])
    # --save_root inside the dataset
    sketches = tiny_data / 'synthetic' / 'val' / 'sketch'
    class_folder = sorted(sketches.iterdir())[0]
    check_cli(capsys, retrieval.main, ['--data_base', checkpoint, '--query_name', class_folder, '--save_root',
                                       class_folder], r"--save_root '.*' is inside the dataset", unchanged=[sketches])
    # its own outputs are replaced on a second run, and only its own files in its folders
    (results / 'benchmark.png').unlink()
    retrieval.main(['--data_base', str(checkpoint), '--query_name', str(query), '--save_root', str(results)])
    (results / 'benchmark' / 'notes.txt').write_text('mine')
    retrieval.main(['--data_base', str(checkpoint), '--query_name', str(query), '--save_root', str(results),
                    '--num', '2'])
    assert (results / 'benchmark' / 'notes.txt').read_text() == 'mine'
    assert len(list((results / 'benchmark').glob('retrieval_*.jpg'))) == 2
    assert (results / 'other' / 'benchmark.md').read_text() == 'a table'


def test_test_py_refuses_vectors_of_another_epoch_or_run(run, tiny_data, tmp_path, capsys):
    out = copy_run(run, tmp_path)
    model = load_torch(out / f'{PREFIX}_model.pth', CHECKPOINT_FORMAT, 'checkpoint')
    save_torch({**model, 'epoch': model['epoch'] + 5}, out / 'later_model.pth')
    check_cli(capsys, retrieval.main, ['--data_base', out / 'later_model.pth', '--vectors',
                                       out / f'{PREFIX}_vectors.pth', '--save_root', tmp_path / 'pics'],
              rf"holds the embeddings of epoch {model['epoch']}, but '.*later_model.pth' is epoch {model['epoch'] + 5} "
              r"of that run: pass its _model.pth \(the best epoch\), or --evaluate")
    save_torch({**model, 'run_id': 'another'}, out / 'other_model.pth')
    check_cli(capsys, retrieval.main, ['--data_base', out / 'other_model.pth', '--vectors',
                                       out / f'{PREFIX}_vectors.pth', '--save_root', tmp_path / 'pics'],
              r"holds the embeddings of another run than '.*other_model.pth'")
    assert not (tmp_path / 'pics').exists()


@pytest.mark.parametrize('content, message', [
    (b'', r"cannot be read as a checkpoint: the file is empty \(0 bytes\)"),
    (b'my notes, not a checkpoint', r'cannot be read as a checkpoint: it is not a file written by torch.save'),
    ('no-args', r"is an incomplete checkpoint: it lacks args"),
    ('no-img-size', r"is an incomplete checkpoint: it lacks args.img_size"),
])
def test_test_py_bad_checkpoint_files(run, tmp_path, capsys, content, message):
    path = tmp_path / 'bad_model.pth'
    model = load_torch(run / f'{PREFIX}_model.pth', CHECKPOINT_FORMAT, 'checkpoint')
    if content == 'no-args':
        save_torch({k: v for k, v in model.items() if k != 'args'}, path)
    elif content == 'no-img-size':
        save_torch({**model, 'args': {k: v for k, v in model['args'].items() if k != 'img_size'}}, path)
    else:
        path.write_bytes(content)
    err = check_cli(capsys, retrieval.main, ['--data_base', path, '--save_root', tmp_path / 'out'], message)
    assert 'weights_only' not in err


def test_test_py_unwritable_save_root_and_junk_gallery_photo(run, tiny_data, tmp_path, capsys):
    checkpoint = run / f'{PREFIX}_model.pth'
    (tmp_path / 'file').write_text('x')
    check_cli(capsys, retrieval.main, ['--data_base', checkpoint, '--save_root', tmp_path / 'file' / 'out'],
              r"--save_root '.*file/out' cannot be created: '.*file' is a file")
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    for photo in (data / 'synthetic' / 'val' / 'photo').rglob('*.jpg'):
        photo.write_bytes(b'junk, same name')  # every gallery photo, so that the top k hits one
    check_cli(capsys, retrieval.main, ['--data_base', checkpoint, '--data_root', data, '--save_root', tmp_path / 'o'],
              r"gallery photo unreadable \(changed since the gallery was embedded\?\): cannot read image '.*\.jpg'")
    check_cli(capsys, retrieval.main, ['--data_base', checkpoint, '--data_root', data, '--evaluate', '--workers', 2],
              r"cannot read image '.*synthetic/val/photo/.*\.jpg'")


# ----------------------------------------------------------------------------------------------- others

def test_prepare_py_errors(tiny_data, tmp_path, capsys):
    check_cli(capsys, prepare.main, ['cache', '--data_root', tiny_data, '--data_name', 'synthetic', '--img_size', 0],
              '--img_size must be a multiple of 4 from 32 to 2048, got 0', unchanged=[tiny_data])
    (tmp_path / 'file').write_text('x')
    check_cli(capsys, prepare.main, ['synthetic', '--data_root', tmp_path / 'file'], r"--data_root '.*file' is a file")
    check_cli(capsys, prepare.main, ['synthetic', '--data_root', tiny_data], r"synthetic' already exists: remove it, "
              r"pass --overwrite", unchanged=[tiny_data])
    check_cli(capsys, prepare.main, ['synthetic', '--data_root', tmp_path / 'new', '--num_sketches', 0],
              '--num_sketches must be from 1 to 100000, got 0')
    check_cli(capsys, prepare.main, ['synthetic', '--data_root', tmp_path / 'new', '--num_val_photos', 10 ** 12],
              '--num_val_photos must be from 1 to 100000, got 1000000000000')
    check_cli(capsys, prepare.main, ['synthetic', '--num_classes', 99], r'--num_classes must be at most 34')
    check_cli(capsys, prepare.main, ['sketchy', '--split', '25', '--sketch_dir', tmp_path / 'x', '--photo_dir',
                                     tmp_path / 'y'], r"sketch folder not found: '.*x'")
    assert not (tmp_path / 'new').exists()
    prepare.main(['synthetic', '--data_root', str(tmp_path / 'again'), '--num_sketches', '1', '--num_photos', '1',
                  '--num_val_photos', '1', '--img_size', '32'])
    prepare.main(['synthetic', '--data_root', str(tmp_path / 'again'), '--num_sketches', '2', '--num_photos', '1',
                  '--num_val_photos', '1', '--img_size', '32', '--overwrite'])
    assert len(list((tmp_path / 'again' / 'synthetic' / 'train' / 'sketch').rglob('*.png'))) == 2 * 15


def test_benchmark_table_over_odd_files(tmp_path, capsys):
    (tmp_path / 'empty_results.csv').write_text('')
    (tmp_path / 'synthetic_acnet_resnet50_512_results.csv').write_text('')
    (tmp_path / 'synthetic_msedge_resnet50_512_results.csv').write_text('epoch,precise\n1,0.5\n')
    check_cli(capsys, reproduce.main, ['--table_only', '--save_root', tmp_path],
              r"no complete run of train.py under '.*'", unchanged=[tmp_path])
    check_cli(capsys, reproduce.main, ['--save_root', tmp_path / 'a', '--datasets', 'synthetic', '--', '--save_root',
                                       tmp_path / 'b'], r'--save_root after -- would send the runs elsewhere')
    fake_run(tmp_path, 'synthetic_acnet_resnet50_512_w1-0-1_on-photo-fake', [0.2, 0.3])
    reproduce.main(['--table_only', '--save_root', str(tmp_path)])
    captured = capsys.readouterr()
    assert '| acnet w1-0-1 on-photo-fake (ours) | resnet50 | 512 | test | sake | 30.0 |' in captured.out
    assert 'empty_results.csv: not named as train.py names its results' in captured.out
    fake_run(tmp_path, 'synthetic_acnet_resnet50_512_copy', [0.2])  # not a variant acnet's files ever have
    reproduce.main(['--table_only', '--save_root', str(tmp_path)])
    assert 'synthetic_acnet_resnet50_512_copy_results.csv: not named as train.py names' in capsys.readouterr().out


def test_convert_py_needs_a_file_name(tmp_path, capsys):
    check_cli(capsys, convert.main, ['--extractor', 'e.pth', '--generator', 'g.pth', '--save', tmp_path],
              r"--save '.*' is a folder: name the checkpoint file to write")


def test_probe_of_every_command(run, tiny_data, tmp_path, capsys):
    """Inputs a hostile probe tried: each one line, exit 2, nothing written."""
    import speed
    checkpoint = run / f'{PREFIX}_model.pth'
    (tmp_path / 'notes.txt').write_text('hello')
    train_base = tiny(tiny_data, tmp_path / 'out')
    cases = [
        (train_main, ['--data_root', '', '--save_root', tmp_path / 'out'], '--data_root must not be empty'),
        (train_main, train_base + ['--data_name', '../synthetic'], '--data_name must be the name of a folder'),
        (train_main, tiny(tiny_data, tiny_data / 'synthetic' / 'val' / 'runs'), r"--save_root '.*runs' is inside the dataset"),
        (train_main, train_base + ['--seed', str(10 ** 23)], '--seed must be from 0 to 2147483647'),
        (train_main, train_base + ['--img_size', '100000'], '--img_size must be a multiple of 4 from 32 to 2048'),
        (train_main, train_base + ['--lr', 'inf'], '--lr must be a positive number, got inf'),
        (train_main, train_base + ['--loss_weights', 'nan', '1', '1'], '--loss_weights must be >= 0'),
        (train_main, ['--data_root', tiny_data, '--data_name', 'synthetic', '--img_size', '32', '--device', DEVICE,
                      '--save_root', tmp_path / 'out', '--weights', tmp_path],
         "--weights '.*' is a folder: name the weights file in it"),
        (retrieval.main, ['--data_base', checkpoint, '--query_name', ''], '--query_name must not be empty'),
        (retrieval.main, ['--data_base', run], "'.*' is a folder, not a checkpoint: name the file"),
        (retrieval.main, ['--data_base', checkpoint, '--vectors', checkpoint], 'is not a vectors file of this repo'),
        (retrieval.main, ['--data_base', checkpoint, '--query_name', tmp_path / 'notes.txt', '--save_root',
                          tmp_path / 'out'], r"cannot read image '.*notes.txt'"),
        (prepare.main, ['synthetic', '--data_root', ''], '--data_root must not be empty'),
        (prepare.main, ['synthetic', '--data_root', tmp_path / 'new', '--seed', '-1'], '--data_seed must be from 0 to '),
        (prepare.main, ['synthetic', '--data_root', tmp_path / 'new', '--preview', tmp_path / 'notes.txt' / 'x.png'],
         "--preview folder '.*notes.txt' is a file"),
        (prepare.main, ['synthetic', '--data_root', tmp_path / 'new', '--preview', tmp_path], 'must name a .png file'),
        (convert.main, ['--extractor', checkpoint, '--generator', checkpoint, '--save', tmp_path / 'c.pth'],
         'is a checkpoint of this repo, not a released state dict: it needs no conversion'),
        (reproduce.main, ['--datasets', 'nowhere', '--save_root', tmp_path / 'b', '--', '--data_root', tiny_data],
         r"--datasets nowhere: no dataset folder '.*nowhere'"),
        (speed.main, ['metrics', '--repeats', '0'], '--repeats must be from 1 to 1000, got 0'),
        (speed.main, ['train', '--steps', '0'], '--steps must be from 1 to 1000000, got 0'),
        (retrieval.main, ['--evaluate', '--training_free', '--no_pretrained', '--data_root', tiny_data, '--data_name',
                          'synthetic', '--img_size', '100000'], '--img_size must be a multiple of 4 from 32 to 2048'),
        (train_main, train_base + ['--method', 'msedge', '--feature_levels', '0', '1', '9'],
         r'--feature_levels 0 1 9: give three levels of resnet50 from shallow to deep, each from 0 to 4 \(e.g. 2 3 4\)'),
        (train_main, train_base + ['--method', 'msedge', '--feature_levels', '4', '3', '2'],
         r'--feature_levels 4 3 2: give three levels of resnet50 from shallow to deep'),
        (train_main, train_base + ['--method', 'msedge', '--feature_levels', '-1', '0', '1'],
         r'--feature_levels -1 0 1: give three levels'),
        (train_main, train_base + ['--method', 'clipprompt', '--triplet_margin', '0', '--backbone_type', 'ViT-B-32'],
         r'--triplet_margin must be a positive number, got 0.0'),
        (train_main, ['--data_root', tmp_path, '--data_name', 'sketchy', '--no_pretrained', '--save_root', tmp_path / 'o'],
         r'build it from its download with `python prepare.py sketchy --split 21\|25'),
        (speed.main, ['train', '--backbones', 'resnet50', 'resnt50'], r"--backbones 'resnt50': timm has no model"),
        (speed.main, ['metrics', '--devices', 'cpu', 'gpu0'], r"--devices 'gpu0' is not a device name"),
    ]
    for main, argv, match in cases:
        check_cli(capsys, main, argv, match, unchanged=[tiny_data, run])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['notes.txt']  # nothing was created


def test_round_two_probe_one_line_each(run, tmp_path, capsys):
    """The second hostile probe's inputs (issue: reliability round 2): one line, exit 2, nothing written."""
    import speed
    import plot
    checkpoint = run / f'{PREFIX}_model.pth'
    fake_run(tmp_path, 'synthetic_acnet_resnet50_64', [0.2, 0.5])
    good = (tmp_path / 'synthetic_acnet_resnet50_64_results.csv').read_text().splitlines()
    for name, cell in (('text', 'abc'), ('empty', '')):
        header, first, second = good[0].split(','), good[1].split(','), good[2]
        first[header.index('mAP@all')] = cell
        folder = tmp_path / name
        folder.mkdir()
        (folder / 'synthetic_acnet_resnet50_64_results.csv').write_text('\n'.join([good[0], ','.join(first), second]))
        match = rf"results CSV of train.py: row 2, column mAP@all holds '{cell if cell else 'nan'}', not a number"
        check_cli(capsys, plot.main, ['curves', '--results', folder / 'synthetic_acnet_resnet50_64_results.csv',
                                      '--save_root', tmp_path / 'figures'], match, unchanged=[folder])
        with pytest.raises(SystemExit):  # the table leaves that run out, and says why
            reproduce.main(['--table_only', '--save_root', str(folder)])
        assert f"skipped {folder / 'synthetic_acnet_resnet50_64_results.csv'}: it is not a results CSV" in \
            capsys.readouterr().out
    cases = [
        (speed.main, ['search', '--dim', '0'], '--emb_dim must be from 1 to 65536, got 0'),
        (speed.main, ['search', '--clusters', '0'], '--clusters must be from 1 to 10000000, got 0'),
        (convert.main, ['--extractor', 'e.pth', '--generator', 'g.pth', '--save', tmp_path / 'c.pth', '--img_size',
                        '0'], '--img_size must be a multiple of 4 from 32 to 2048, got 0'),
        (plot.main, ['tsne', '--data_base', checkpoint, '--seed', '-1', '--save_root', tmp_path / 'figures'],
         '--seed must be from 0 to 2147483647, got -1'),
    ]
    for main, argv, match in cases:
        check_cli(capsys, main, argv, match, unchanged=[run])
    assert not (tmp_path / 'figures').exists() and not (tmp_path / 'c.pth').exists()


def test_a_killed_loader_process_is_one_line_naming_workers(tiny_data, tmp_path, capsys, monkeypatch):
    """What the out-of-memory killer does to a data-loader worker: one line that suggests the remedy."""
    import signal
    from zs_sbir import images
    from torch.utils.data import get_worker_info
    read = images.FileImages.__getitem__

    def killed(self, index):
        if get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return read(self, index)
    monkeypatch.setattr(images.FileImages, '__getitem__', killed)
    check_cli(capsys, train_main, tiny(tiny_data, tmp_path / 'out', '--epochs', '1', '--workers', '1'),
              r'a data loader process was killed \(.*\), most likely for lack of memory: lower --workers or --batch_size')


def test_a_run_that_finished_while_this_one_waited_is_not_replaced(tiny_data, tmp_path, capsys, monkeypatch):
    """train.py checks --save_root before it waits (for a dataset another process generates) and again under the
    run's lock: a run with the same options that finished meanwhile is kept, and this one stops in one line."""
    import train as train_module
    real_load_splits = train_module.load_splits

    finished = {}

    def waited(args, log=print):
        monkeypatch.setattr(train_module, 'load_splits', real_load_splits)  # the other run does not wait
        train(parse_args(tiny(tiny_data, tmp_path, '--epochs', '1')))  # the other run, finishing meanwhile
        finished.update(digests(tmp_path))
        return real_load_splits(args, log)
    monkeypatch.setattr(train_module, 'load_splits', waited)
    with pytest.raises(SystemExit) as exit_info:
        train_main(tiny(tiny_data, tmp_path, '--epochs', '1', '--seed', '7'))
    assert exit_info.value.code == 2 and 'exists from an earlier run: pass --resume' in capsys.readouterr().err
    assert finished and digests(tmp_path) == finished  # the other run's files, untouched


def test_an_atomic_write_leaves_no_temporary_file_on_ctrl_c_or_a_folder_in_the_way(tmp_path):
    from zs_sbir.cli import UserError
    from zs_sbir.safe_files import atomic_write, save_together
    target = tmp_path / 'file.bin'
    target.write_bytes(b'old')

    def interrupted(tmp):
        Path(tmp).write_bytes(b'half')
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['file.bin'] and target.read_bytes() == b'old'
    (tmp_path / 'folder').mkdir()  # a folder where the second file goes: the first is renamed, the second is not
    with pytest.raises(UserError, match=r"could not write '.*folder' \(Is a directory\): move what is there away"):
        save_together([(target, lambda tmp: Path(tmp).write_bytes(b'new')),
                       (tmp_path / 'folder', lambda tmp: Path(tmp).write_bytes(b'x'))])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['file.bin', 'folder'] and target.read_bytes() == b'new'
