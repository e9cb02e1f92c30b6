"""Resume, safe saving, bad inputs and multi-process training."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train as train_module
from methods.acnet import ACNet
from zs_sbir import training
from zs_sbir.seeding import configure_backends
from helpers import BITWISE, ROOT, free_port, private_copy, tiny
from zs_sbir.config import parse_args
from train import main, train
from zs_sbir.checkpoint import CHECKPOINT_FORMAT, VECTORS_FORMAT, load_torch
from zs_sbir.cli import UserError
from zs_sbir.images import FileImages
from zs_sbir.safe_files import atomic_write, read_csv
from utils import scan_split

PREFIX = 'synthetic_acnet_resnet50_8'


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_resume_gives_the_same_results_as_an_uninterrupted_run(tiny_data, tmp_path):
    train(parse_args(tiny(tiny_data, tmp_path / 'straight', '--epochs', '4', *BITWISE)))
    train(parse_args(tiny(tiny_data, tmp_path / 'resumed', '--epochs', '2', *BITWISE)))
    train(parse_args(tiny(tiny_data, tmp_path / 'resumed', '--epochs', '4', '--resume', *BITWISE)))
    straight = read_csv(tmp_path / 'straight' / f'{PREFIX}_results.csv')
    resumed = read_csv(tmp_path / 'resumed' / f'{PREFIX}_results.csv')
    assert len(straight) == 4 and resumed == straight
    a = load_torch(tmp_path / 'straight' / f'{PREFIX}_last.pth', CHECKPOINT_FORMAT, 'checkpoint')
    b = load_torch(tmp_path / 'resumed' / f'{PREFIX}_last.pth', CHECKPOINT_FORMAT, 'checkpoint')
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert a['best'] == b['best']


def test_earlier_results_are_never_silently_replaced(tiny_data, tmp_path):
    train(parse_args(tiny(tiny_data, tmp_path, '--epochs', '1')))
    before = (tmp_path / f'{PREFIX}_results.csv').read_text()
    with pytest.raises(UserError, match=r'exists from an earlier run: pass --resume to continue it, --overwrite'):
        train(parse_args(tiny(tiny_data, tmp_path, '--epochs', '1', '--lr', '1e-2')))
    assert (tmp_path / f'{PREFIX}_results.csv').read_text() == before
    with pytest.raises(UserError, match=r'cannot resume .* with different run options: --lr 0.001 -> 0.01'):
        train(parse_args(tiny(tiny_data, tmp_path, '--epochs', '2', '--lr', '1e-2', '--resume')))
    with pytest.raises(UserError, match='nothing to resume'):
        train(parse_args(tiny(tiny_data, tmp_path / 'other', '--resume')))
    train(parse_args(tiny(tiny_data, tmp_path, '--epochs', '1', '--overwrite', '--seed', '5')))
    assert (tmp_path / f'{PREFIX}_results.csv').read_text() != before


def _fail_in_epoch(monkeypatch, epoch, error):
    real = train_module.train_epoch

    def train_epoch(nets, optimizers, loader, rt, desc, **kw):
        if desc.startswith(f'epoch {epoch}/'):
            raise error
        return real(nets, optimizers, loader, rt, desc, **kw)
    monkeypatch.setattr(train_module, 'train_epoch', train_epoch)


def test_ctrl_c_keeps_the_last_complete_epoch(tiny_data, tmp_path, monkeypatch, capsys):
    _fail_in_epoch(monkeypatch, 2, KeyboardInterrupt())
    code, err = run_main(tiny(tiny_data, tmp_path, '--epochs', '3'), capsys)
    assert code == 130 and 'continue with --resume' in err
    last = load_torch(tmp_path / f'{PREFIX}_last.pth', CHECKPOINT_FORMAT, 'checkpoint')
    assert last['epoch'] == 1 and len(read_csv(tmp_path / f'{PREFIX}_results.csv')) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]  # no temporary files left
    monkeypatch.undo()
    train(parse_args(tiny(tiny_data, tmp_path, '--epochs', '3', '--resume')))
    assert len(read_csv(tmp_path / f'{PREFIX}_results.csv')) == 3


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    real_step = ACNet.training_step
    calls = {'n': 0}

    def step(self, nets, optimizers, batch):
        losses = real_step(self, nets, optimizers, batch)
        calls['n'] += 1
        if calls['n'] > 4:  # 16 train sketches, 4 pairs per step: 4 steps per epoch, so epoch 2 goes wrong
            losses['class_loss'] = losses['class_loss'] * float('nan')
        return losses
    monkeypatch.setattr(ACNet, 'training_step', step)
    code, err = run_main(tiny(tiny_data, tmp_path, '--epochs', '3'), capsys)
    assert code == 2 and 'epoch 2/3: a loss became NaN or infinite' in err and 'lower --lr' in err
    assert load_torch(tmp_path / f'{PREFIX}_last.pth', CHECKPOINT_FORMAT, 'checkpoint')['epoch'] == 1
    assert load_torch(tmp_path / f'{PREFIX}_model.pth', CHECKPOINT_FORMAT, 'checkpoint')['epoch'] == 1


def test_a_collapsed_network_stops_the_run_like_a_nan_loss(tiny_data, tmp_path, monkeypatch, capsys):
    """Every val embedding the same vector (as after --lr 1e30): its metrics would only rank ties, and would
    have been selected as best."""
    real_embed = ACNet.embed
    calls = {'n': 0}

    def embed(self, images, domains):
        calls['n'] += 1
        vectors = real_embed(self, images, domains)
        return torch.zeros_like(vectors) if calls['n'] > 1 else vectors  # the untrained evaluation is one batch
    monkeypatch.setattr(ACNet, 'embed', embed)
    code, err = run_main(tiny(tiny_data, tmp_path, '--epochs', '2', '--eval_batch_size', '64'), capsys)
    assert code == 2 and 'epoch 1/2: every val embedding is the same vector (the network collapsed)' in err
    assert not (tmp_path / f'{PREFIX}_model.pth').exists()


def test_atomic_write_never_leaves_a_half_written_file(tmp_path):
    target = tmp_path / 'results.csv'
    target.write_text('good')

    def broken(tmp):
        with open(tmp, 'w') as f:
            f.write('half')
        raise OSError('disk full')
    with pytest.raises(UserError, match=r"could not write '.*results.csv' \(disk full; \d+ MB free there\)"):
        atomic_write(target, broken)
    assert target.read_text() == 'good' and os.listdir(tmp_path) == ['results.csv']


@pytest.fixture()
def broken_data(tiny_data, tmp_path):
    """A copy of the tiny dataset with one truncated photo in train and one garbage photo in val."""
    root = tmp_path / 'broken'
    shutil.copytree(tiny_data, root)
    train_photo = sorted((root / 'synthetic' / 'train' / 'photo').rglob('*.jpg'))[0]
    train_photo.write_bytes(train_photo.read_bytes()[:200])
    val_photo = sorted((root / 'synthetic' / 'val' / 'photo').rglob('*.jpg'))[0]
    val_photo.write_bytes(b'this is not a jpeg')
    return root, train_photo, val_photo


@pytest.mark.parametrize('workers', ['0', '2'])
def test_a_corrupt_image_is_an_error_naming_the_file(broken_data, tmp_path, capsys, workers):
    root, _, val_photo = broken_data
    code, err = run_main(tiny(root, tmp_path / 'out', '--epochs', '1', '--workers', workers), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1  # one line, also from a loader process
    assert 'cannot read image' in err and "synthetic/" in err and ('.jpg' in err)


def test_skip_bad_images_logs_counts_and_skips(broken_data, tmp_path, capsys):
    root, train_photo, val_photo = broken_data
    train(parse_args(tiny(root, tmp_path, '--epochs', '1', '--skip_bad_images')))
    out = capsys.readouterr().out
    assert 'left out 2 unreadable images' in out
    listed = (tmp_path / f'{PREFIX}_bad_images.txt').read_text().split()
    assert sorted(listed) == sorted([str(train_photo), str(val_photo)])
    vectors = load_torch(tmp_path / f'{PREFIX}_vectors.pth', VECTORS_FORMAT, 'vectors')
    assert len(vectors['paths']) == len(scan_split(root, 'synthetic', 'val')) - 1


def test_unwritable_save_root_and_unreadable_data_root(tiny_data, tmp_path, monkeypatch):
    (tmp_path / 'a-file').write_text('')
    with pytest.raises(UserError, match=r"--save_root '.*a-file/results' cannot be created: '.*a-file' is a file"):
        train(parse_args(tiny(tiny_data, tmp_path / 'a-file' / 'results')))
    real_access = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode: False if str(p) == str(tiny_data) else real_access(p, mode))
    with pytest.raises(UserError, match=r"data root is not readable: .*check its permissions"):
        train(parse_args(tiny(tiny_data, tmp_path / 'out')))


def test_checkpoints_load_with_weights_only(tmp_path):
    class Sneaky:
        def __reduce__(self):
            return (os.system, ('echo pwned',))
    torch.save({'format': CHECKPOINT_FORMAT, 'payload': Sneaky()}, tmp_path / 'evil.pth')
    with pytest.raises(UserError, match=r"cannot be read as a checkpoint: it holds Python objects other than "
                                        r"tensors and plain containers, which are never loaded here"):
        load_torch(tmp_path / 'evil.pth', CHECKPOINT_FORMAT, 'checkpoint')


def test_two_gloo_processes_match_one_process(tiny_data, tmp_path):
    """torchrun with 2 CPU processes (batch 4 pairs each) against 1 process (batch 8 pairs): the same
    samples per step and averaged gradients, so the same metrics up to float error."""
    # gloo: CPU processes; --eval_queries: the selected epoch is evaluated in full at the end, from its file,
    # which the other process must wait for (the GPU check's torchrun has one process: no waiting there)
    common = tiny(tiny_data, tmp_path, '--epochs', '2', '--warmup', '1', '--device', 'cpu', '--eval_queries', '5')
    single = common[:common.index('--batch_size') + 1] + ['16'] + common[common.index('--batch_size') + 2:]
    single[single.index('--save_root') + 1] = str(tmp_path / 'one')
    train(parse_args(single))
    double = common[:common.index('--batch_size') + 1] + ['8'] + common[common.index('--batch_size') + 2:]
    double[double.index('--save_root') + 1] = str(tmp_path / 'two')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                             '--master_port', '29531', str(ROOT / 'train.py'), *double],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'effective batch size 2 x 8 = 16' in result.stdout
    one = read_csv(tmp_path / 'one' / 'synthetic_acnet_resnet50_8_results.csv')
    two = read_csv(tmp_path / 'two' / 'synthetic_acnet_resnet50_8_results.csv')
    assert len(one) == len(two) == 3 and one[-1]['eval_queries'] == two[-1]['eval_queries'] == 'all'
    for a, b in zip(one, two):
        for name in ('mAP@all', 'P@100', 'precise') + (('class_loss', 'adv_loss') if a['class_loss'] else ()):
            assert float(a[name]) == pytest.approx(float(b[name]), abs=1e-4), name  # measured: 1e-6


def test_torchrun_with_one_process_still_starts_a_process_group(monkeypatch):
    """`torchrun --nproc_per_node 1` is how a user checks the multi-GPU path on one GPU: it must run DDP."""
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(free_port()))
    for name, value in (('RANK', '0'), ('LOCAL_RANK', '0'), ('WORLD_SIZE', '1')):
        monkeypatch.setenv(name, value)
    rt = training.init_distributed('cpu')
    try:
        assert torch.distributed.is_initialized() and torch.distributed.get_backend() == 'gloo'
        assert (rt.rank, rt.world, rt.device) == (0, 1, torch.device('cpu'))
        assert isinstance(rt.ddp(torch.nn.Linear(2, 2)), torch.nn.parallel.DistributedDataParallel)
    finally:
        torch.distributed.destroy_process_group()
    monkeypatch.delenv('RANK')
    assert training.init_distributed('cpu').ddp is None  # a plain `python train.py`


def test_more_torchrun_processes_than_gpus_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    for name, value in (('RANK', '2'), ('LOCAL_RANK', '2'), ('WORLD_SIZE', '3')):
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=r'torchrun started process 2 of this machine, which has 2 GPU\(s\): pass '
                                        r'--nproc_per_node at most that many'):
        training.init_distributed('cuda')


@pytest.mark.parametrize('first', [True, False])
def test_deterministic_is_set_both_ways(first, monkeypatch):
    """Runs in one process (tests, notebooks) must not inherit an earlier run's --deterministic."""
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)  # restored afterwards
    cudnn = torch.backends.cudnn
    before = torch.are_deterministic_algorithms_enabled(), cudnn.benchmark, cudnn.deterministic
    try:
        for deterministic in (first, not first):
            configure_backends(parse_args(['--deterministic'] if deterministic else []).deterministic)
            assert torch.are_deterministic_algorithms_enabled() == deterministic
            assert cudnn.deterministic == deterministic and cudnn.benchmark != deterministic
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=True)
        cudnn.benchmark, cudnn.deterministic = before[1:]


def test_worker_pools_keep_order_and_a_dead_worker_is_one_error_not_a_hang():
    """multiprocessing.Pool waited forever when a worker died (CI hung 90 minutes on a SIGBUS in the cache's
    workers); every pool of the commands is map_in_processes now, which raises."""
    from helpers import double_or_die
    from zs_sbir.processes import WorkerDied, map_in_processes
    assert list(map_in_processes(double_or_die, list(range(20)), 2, 'doubling', chunksize=3)) == \
        [2 * i for i in range(20)]
    with pytest.raises(WorkerDied, match=r'^doubling stopped: a worker process died .*memory or disk space'):
        list(map_in_processes(double_or_die, [1, 2, 'die', 4], 2, 'doubling'))


def test_the_cache_keeps_nothing_on_a_full_disk_or_a_dead_worker(tiny_data, tmp_path, monkeypatch):
    from helpers import kill_self
    from zs_sbir import image_cache
    tiny_data = private_copy(tiny_data, tmp_path)
    folder = image_cache.cache_path(tiny_data, 'synthetic', 'train', 36, 'bilinear').parent

    def no_space(fd, offset, length):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(image_cache.os, 'posix_fallocate', no_space)  # before any worker writes into a map
    with pytest.raises(UserError, match=r"could not write the image cache .*train_36_bilinear.npy' "
                                        r"\(\[Errno 28\] No space left on device\): nothing was kept"):
        image_cache.build_cache(tiny_data, 'synthetic', 36, 'bilinear', workers=2)
    assert not [p.name for p in folder.iterdir() if '36' in p.name]
    monkeypatch.undo()
    monkeypatch.setattr(image_cache, '_fill', kill_self)
    with pytest.raises(UserError, match=r"writing the image cache .*train_36_bilinear.npy' stopped: a worker"):
        image_cache.build_cache(tiny_data, 'synthetic', 36, 'bilinear', workers=2)
    assert not [p.name for p in folder.iterdir() if '36' in p.name]


def test_prepare_with_a_dead_worker_writes_no_dataset(tmp_path, monkeypatch):
    from helpers import kill_self
    from zs_sbir import synthetic
    monkeypatch.setattr(synthetic, '_draw_folder_job', kill_self)
    with pytest.raises(UserError, match=r"drawing the generated dataset .* stopped: a worker process died"):
        synthetic.make_synthetic(tmp_path, num_classes=4, num_val_classes=2, num_sketches=2, num_photos=2,
                                 num_val_photos=2, img_size=32, workers=2)
    assert not list(tmp_path.iterdir())  # no dataset, no half-drawn copy


def test_the_cache_builds_where_blocks_cannot_be_reserved(tiny_data, tmp_path, monkeypatch):
    """macOS has no posix_fallocate and some file systems refuse it: the cache is written as before."""
    from zs_sbir import image_cache
    tiny_data = private_copy(tiny_data, tmp_path)

    def unsupported(fd, offset, length):
        raise OSError(95, 'Operation not supported')
    for patch in (lambda: monkeypatch.setattr(image_cache.os, 'posix_fallocate', unsupported),
                  lambda: monkeypatch.delattr(image_cache.os, 'posix_fallocate')):
        patch()
        paths = image_cache.build_cache(tiny_data, 'synthetic', 40, 'bilinear', workers=1)
        monkeypatch.undo()
        split = scan_split(tiny_data, 'synthetic', 'val')
        cached = image_cache.CachedImages(tiny_data, 'synthetic', 'val', split, 40, 'acnet', 'bilinear')
        assert torch.equal(cached[2], FileImages(split.root, split.paths, 40, "bilinear")[2])
        assert len(paths) == 2
