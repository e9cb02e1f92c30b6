"""reproduce.py (formerly benchmark.py): the table builder on fabricated results CSVs, and the grid's skipping and dry run."""
import numpy as np
import pytest

import reproduce
from helpers import check_cli, fake_run
from utils import METRIC_NAMES
from zs_sbir.safe_files import read_csv, write_csv


def test_best_rows_follow_each_runs_selection_rule(tmp_path):
    fake_run(tmp_path, 'sketchy_acnet_resnet50_512', [0.30, 0.52, 0.41])
    fake_run(tmp_path, 'tuberlin_acnet_resnet50_512', [0.20, 0.25, 0.61], heldout=[0.9, 0.1, 0.2], select_on='heldout')
    rows = reproduce.best_rows(tmp_path).set_index('dataset')
    assert rows.loc['sketchy', 'epoch'] == 2 and abs(rows.loc['sketchy', 'mAP@all'] - 52.0) < 1e-9
    # held-out selection takes epoch 1 although the test metrics peak at epoch 3
    assert rows.loc['tuberlin', 'epoch'] == 1 and abs(rows.loc['tuberlin', 'P@100'] - 20.0) < 1e-9
    assert rows.loc['tuberlin', 'select_on'] == 'heldout'


def test_table_has_the_seed_layout_and_published_numbers(tmp_path):
    fake_run(tmp_path, 'sketchy_acnet_resnet50_512', [0.501, 0.517])
    fake_run(tmp_path, 'tuberlin_acnet_resnet50_512', [0.577])
    fake_run(tmp_path, 'sketchy_msedge_vgg16_64', [0.3])
    table = reproduce.build_table(reproduce.best_rows(tmp_path), all_metrics=True).splitlines()
    assert table[0] == ('| method | backbone | dim | selected on | metrics | Sketchy Extended mAP@200 | Sketchy Extended mAP@all | '
                        'Sketchy Extended P@100 | Sketchy Extended P@200 | Sketchy Extended precise | TU-Berlin Extended '
                        'mAP@200 | TU-Berlin Extended mAP@all | TU-Berlin Extended P@100 | TU-Berlin Extended P@200 | '
                        'TU-Berlin Extended precise |')  # all_metrics: precise too (papers report the four)
    assert ('| acnet (ours) | resnet50 | 512 | test | sake | 51.7 | 51.7 | 51.7 | 51.7 | 51.7 | 57.7 | 57.7 | 57.7 | '
            '57.7 | 57.7 |') in table
    assert ('| acnet (published) | resnet50 | 512 | test | sake | 51.7 | 55.9 | 64.3 | 60.8 |  | 57.7 | 57.7 | 65.8 | '
            '64.4 |  |') in table
    assert '| msedge (ours) | vgg16 | 64 | test | sake | 30.0 | 30.0 | 30.0 | 30.0 | 30.0 |  |  |  |  |  |' in table
    assert not any('msedge (published)' in line for line in table)  # MSEdge published none


def test_grid_skips_finished_runs_and_dry_run_runs_nothing(tmp_path, capsys):
    argv = ['--methods', 'acnet', '--backbones', 'resnet50', 'vgg16', '--emb_dims', '512', '--datasets', 'synthetic',
            '--save_root', str(tmp_path), '--dry_run', '--', '--epochs', '2', '--no_pretrained']
    fake_run(tmp_path, 'synthetic_acnet_resnet50_512', [0.2, 0.3])  # finished: 2 of 2 epochs
    fake_run(tmp_path, 'synthetic_acnet_vgg16_512', [0.2])  # interrupted after 1 of 2
    reproduce.main(argv)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f'done already: {tmp_path}/synthetic_acnet_resnet50_512_results.csv'
    assert out[1].endswith('train.py --method acnet --backbone_type vgg16 --emb_dim 512 --data_name synthetic '
                           f'--save_root {tmp_path} --select_on test --epochs 2 --no_pretrained --resume')
    assert len(out) == 2 and not (tmp_path / 'benchmark.md').exists()


def test_only_complete_runs_are_done_or_tabled(tmp_path, capsys):
    """A run that never scored its selected epoch on every sketch (--eval_queries), one whose _last.pth is
    behind, one with none, and results CSVs that are empty, binary or cut off: none is tabled or called done."""
    fake_run(tmp_path, 'synthetic_acnet_resnet50_512', [0.2, 0.3])
    rows = read_csv(tmp_path / 'synthetic_acnet_resnet50_512_results.csv')
    for row in rows:
        row['eval_queries'] = '50'  # sampled every epoch; the full row of the selected epoch is missing
    write_csv(rows, tmp_path / 'synthetic_acnet_resnet50_512_results.csv')
    fake_run(tmp_path, 'synthetic_msedge_resnet50_512', [0.2, 0.3], epochs=5)  # stopped at 2 of 5
    fake_run(tmp_path, 'synthetic_acnet_vgg16_512', [0.4])
    (tmp_path / 'synthetic_acnet_vgg16_512_last.pth').unlink()
    for name, data in (('synthetic_msedge_vgg16_512', b''), ('synthetic_acnet_resnet50_64', b'\x00\xff' * 50),
                       ('synthetic_msedge_resnet50_64', b'epoch,precise,mAP@200\n1,0.5')):
        fake_run(tmp_path, name, [0.5])
        (tmp_path / f'{name}_results.csv').write_bytes(data)
    argv = ['--methods', 'acnet', 'msedge', '--backbones', 'resnet50', 'vgg16', '--emb_dims', '64', '512', '--datasets',
            'synthetic', '--save_root', str(tmp_path), '--dry_run', '--', '--no_pretrained']
    reproduce.main(argv)
    out = capsys.readouterr().out
    assert 'done already' not in out and out.count('train.py') == 8
    with pytest.raises(SystemExit) as stop:
        reproduce.main(['--table_only', '--save_root', str(tmp_path)])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and 'no complete run of train.py under' in err
    assert 'never scored on every sketch' in out and 'it has 2 of 5 epochs' in out and 'no synthetic_acnet_vgg16_512_last' in out


def test_no_published_rows_for_the_generated_dataset(tmp_path):
    fake_run(tmp_path, 'synthetic_acnet_resnet50_512', [0.25])
    table = reproduce.build_table(reproduce.best_rows(tmp_path))
    assert '(published)' not in table and '| acnet (ours) | resnet50 | 512 | test | sake | 25.0 |' in table


def test_tables_show_the_metrics_papers_compare_per_dataset(tmp_path):
    """TU-Berlin and Sketchy-25: mAP@all, P@100; Sketchy-21: mAP@200, P@200; QuickDraw: mAP@all, P@200."""
    for dataset in ('sketchy21', 'sketchy25', 'tuberlin', 'quickdraw'):
        fake_run(tmp_path, f'{dataset}_acnet_resnet50_512', [0.1, 0.2])
    table = reproduce.build_table(reproduce.best_rows(tmp_path)).splitlines()
    assert table[0] == ('| method | backbone | dim | selected on | metrics | QuickDraw Extended mAP@all | QuickDraw Extended P@200 | '
                        'Sketchy Ext (21) mAP@200 | Sketchy Ext (21) P@200 | Sketchy Ext (25) mAP@all | '
                        'Sketchy Ext (25) P@100 | TU-Berlin Extended mAP@all | TU-Berlin Extended P@100 |')
    assert table[2] == '| acnet (ours) | resnet50 | 512 | test | sake | 20.0 | 20.0 | 20.0 | 20.0 | 20.0 | 20.0 | 20.0 | 20.0 |'
    assert table[3] == '| acnet (published) | resnet50 | 512 | test | sake |  |  |  |  |  |  | 57.7 | 65.8 |'
    assert '| ZSE-SBIR (published, another method) |  |  |  | its paper | 14.5 | 21.6 |  |  |  |  |  |  |' in table
    assert '| Doodle2Search (published, another method) |  |  |  | its paper | 7.5 | 6.8 |  |  |  |  |  |  |' in table


def test_each_row_says_its_metric_convention_and_a_convention_can_be_asked_for(tmp_path):
    fake_run(tmp_path, 'sketchy_acnet_resnet50_512', [0.4, 0.5])
    path = tmp_path / 'sketchy_acnet_resnet50_512_results.csv'
    rows = read_csv(path)
    for row, value in zip(rows, (0.9, 0.3)):  # torchmetrics would pick epoch 1
        row.update({f'torchmetrics_{m}': value for m in (*METRIC_NAMES, 'precise')})
    write_csv(rows, path)
    own = reproduce.best_rows(tmp_path).iloc[0]
    assert (own['metrics'], own['epoch'], own['mAP@all']) == ('sake', 2, 50.0)
    asked = reproduce.best_rows(tmp_path, 'torchmetrics').iloc[0]
    assert (asked['metrics'], asked['epoch'], asked['mAP@all']) == ('torchmetrics', 2, 30.0)  # the run's epoch
    fake_run(tmp_path, 'tuberlin_acnet_resnet50_512', [0.5])  # written before torchmetrics columns existed
    assert list(reproduce.best_rows(tmp_path, 'torchmetrics')['dataset']) == ['sketchy']


def test_seeds_run_each_configuration_per_seed_and_table_mean_and_sample_sd(tmp_path, capsys):
    argv = ['--methods', 'acnet', '--backbones', 'resnet50', '--emb_dims', '512', '--datasets', 'synthetic',
            '--save_root', str(tmp_path), '--seeds', '1', '2', '3', '--fine_grained', '--dry_run', '--', '--epochs', '2']
    fake_run(tmp_path / 'seed-2', 'synthetic_acnet_resnet50_512_fg', [0.2, 0.3])  # seed 2 finished already
    reproduce.main(argv)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[1] == f'done already: {tmp_path}/seed-2/synthetic_acnet_resnet50_512_fg_results.csv'
    for line, seed in ((out[0], 1), (out[2], 3)):
        assert f'--save_root {tmp_path}/seed-{seed} ' in line and line.endswith(f'--fine_grained --seed {seed} --epochs 2')

    # three seeds' runs (precise 0.2, 0.5, 0.6 at their best epochs), each with fine-grained columns
    for seed, best in ((1, 0.2), (2, 0.5), (3, 0.6)):
        fake_run(tmp_path / f'seed-{seed}', 'synthetic_acnet_resnet50_512_fg', [best / 2, best], seed=seed)
        path = tmp_path / f'seed-{seed}' / 'synthetic_acnet_resnet50_512_fg_results.csv'
        write_csv([{**row, 'fg_Acc@1': float(row['precise']) / 10, 'fg_Acc@5': 0.5, 'fg_Acc@10': 0.9}
                   for row in read_csv(path)], path)
    reproduce.main(['--save_root', str(tmp_path), '--table_only', '--all_metrics'])
    table = capsys.readouterr().out
    mean, sd = 100 * np.mean([0.2, 0.5, 0.6]), 100 * np.std([0.2, 0.5, 0.6], ddof=1)  # 43.3, 20.8
    assert f'| acnet fg (ours) | resnet50 | 512 | test | sake | 3 | {mean:.1f} ± {sd:.1f} |' in table
    acc1 = (100 * np.mean([0.02, 0.05, 0.06]), 100 * np.std([0.02, 0.05, 0.06], ddof=1))
    assert f'| {acc1[0]:.1f} ± {acc1[1]:.1f} | 50.0 ± 0.0 | 90.0 ± 0.0 |' in table
    assert 'generated dataset FG Acc@1 | generated dataset FG Acc@5 | generated dataset FG Acc@10 |' in table
    assert 'mean ± sample standard deviation over the seeds (n runs each)' in table


def test_bad_seeds_are_one_line(tmp_path, capsys):
    for seeds, message in ((['1', '1'], '--seeds must differ, got 1 1'), (['-2'], '--seeds must be from 0 to 2147483647, got -2')):
        check_cli(capsys, reproduce.main, ['--datasets', 'synthetic', '--seeds', *seeds, '--save_root', tmp_path / 'x',
                                           '--dry_run'], message)
    assert not (tmp_path / 'x').exists()


def test_a_seed_is_counted_once_and_fg_runs_are_rows_of_their_own(tmp_path, capsys):
    fake_run(tmp_path, 'synthetic_acnet_resnet50_512', [0.4])  # train.py's default seed 1, in --save_root itself
    fake_run(tmp_path / 'seed-1', 'synthetic_acnet_resnet50_512', [0.2], seed=1)  # the same seed again
    fake_run(tmp_path / 'seed-2', 'synthetic_acnet_resnet50_512', [0.3], seed=2)
    fake_run(tmp_path, 'synthetic_acnet_resnet50_512_fg', [0.9])  # the same training, scored fine-grained too
    reproduce.main(['--save_root', str(tmp_path), '--table_only', '--all_metrics'])
    out = capsys.readouterr().out
    assert f'skipped {tmp_path}/synthetic_acnet_resnet50_512_results.csv: another run of the same ' \
        'configuration has seed 1 too' in out
    assert '| acnet (ours) | resnet50 | 512 | test | sake | 2 | 25.0 ± 7.1 |' in out  # seed-1's 0.2 and seed-2's 0.3
    assert '| acnet fg (ours) | resnet50 | 512 | test | sake | 1 | 90.0 |' in out
    check_cli(capsys, reproduce.main, ['--datasets', 'synthetic', '--seeds', '1', '2', '--save_root', tmp_path / 'x',
                                       '--dry_run', '--', '--seed', '7'], '--seed after -- would give every run')
    for name in ('synthetic_acnet_resnet50_512_gzs_fg', 'synthetic_msedge_resnet50_512_edge-none_heldout_gzs_fg',
                 'synthetic_acnet_resnet50_64_extractor-triplet_fg'):
        method, parsed = reproduce.parse_run_name(f'{name}_results.csv')
        assert parsed['fg'] == '_fg' and name.startswith(f"synthetic_{method}_resnet50_{parsed['dim']}"), name


def test_options_after_dashes_that_the_grid_sets_and_a_file_as_save_root_are_refused(tmp_path, capsys):
    for option, own in (('--method', '--methods'), ('--emb_dim', '--emb_dims'), ('--data_name', '--datasets'),
                        ('--select_on', '--select_on'), ('--backbone_type', '--backbones')):
        check_cli(capsys, reproduce.main, ['--datasets', 'synthetic', '--save_root', tmp_path / 'x', '--dry_run', '--',
                                           option, 'msedge'], f"{option} after -- would override the grid in every "
                                                              f"run: use reproduce.py's {own}")
    (tmp_path / 'afile').write_text('mine')
    check_cli(capsys, reproduce.main, ['--datasets', 'synthetic', '--save_root', tmp_path / 'afile', '--dry_run'],
              "--save_root '.*afile' is a file, not a folder")
    assert not (tmp_path / 'x').exists() and (tmp_path / 'afile').read_text() == 'mine'
