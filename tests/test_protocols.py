"""The protocols and ablations beyond the seeds (docs/metrics.md, docs/training.md): generalized ZS-SBIR against a
slow reference built item by item, the training-free baseline against timm computed directly, every ACNet ablation
of the original history against its loss written from the formula, and MSEdge's feature levels."""
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses

import reproduce
import test as retrieval
from argparse import Namespace

from helpers import DEVICE, TINY, check_cli, fake_run, lr, make_model, rng_images, tiny
from methods import get_method
from methods.acnet import ACNet
from train import main as train_main, train
from utils import METRIC_NAMES, PHOTO, SKETCH, Split, hold_out, retrieval_metrics, scan_split
from zs_sbir.checkpoint import CHECKPOINT_FORMAT, load_torch
from zs_sbir.config import parse_args, run_prefix
from zs_sbir.evaluation import GZS_SHARE, gzs_metrics, gzs_seen_items, gzs_shortfall
from zs_sbir.reference_metrics import reference_means
from zs_sbir.safe_files import read_csv
from zs_sbir.synthetic import make_synthetic
from zs_sbir.training import training_nets


# ----------------------------------------------------------------------------------------------- GZS-SBIR

@pytest.mark.parametrize('seed', [1, 2, 7])
def test_gzs_draws_its_seen_items_from_held_out_images_only(tiny_data, seed):
    train_split, val = scan_split(tiny_data, 'synthetic', 'train'), scan_split(tiny_data, 'synthetic', 'val')
    kept, heldout = hold_out(train_split, 0.5, seed)
    seen = gzs_seen_items(heldout, val, seed)
    assert seen.count(PHOTO) == min(heldout.count(PHOTO), int(GZS_SHARE * val.count(PHOTO)))
    assert seen.count(SKETCH) <= int(GZS_SHARE * val.count(SKETCH))
    assert set(seen.paths) <= set(heldout.paths) and not set(seen.paths) & set(kept.paths)
    photo_classes = {label for label, d in zip(seen.labels, seen.domains) if d == PHOTO}
    assert {label for label, d in zip(seen.labels, seen.domains) if d == SKETCH} <= photo_classes
    assert gzs_seen_items(heldout, val, seed).paths == seen.paths  # the same draw for the same seed


def test_gzs_metrics_equal_a_reference_built_item_by_item():
    rng = np.random.default_rng(0)
    val_labels, seen_labels = rng.integers(0, 3, 40), rng.integers(0, 4, 18)
    val_domains, seen_domains = np.tile([SKETCH, PHOTO], 20), np.tile([SKETCH, PHOTO], 9)
    val_vectors, seen_vectors = rng.normal(size=(40, 6)), rng.normal(size=(18, 6))
    seen_vectors[seen_domains == SKETCH] += 2  # seen sketches drift, so mixing them in changes the numbers
    seen_labels[seen_domains == PHOTO] = np.arange(9) % 4  # every seen class has a photo

    class Part:  # what gzs_metrics reads of a split
        def __init__(self, labels, domains, classes):
            self.labels, self.domains, self.classes = labels.tolist(), domains.tolist(), classes
    ours = gzs_metrics(torch.tensor(val_vectors), Part(val_labels, val_domains, ['a', 'b', 'c']),
                       torch.tensor(seen_vectors), Part(seen_labels, seen_domains, ['d', 'e', 'f', 'g']))
    queries, query_labels, gallery, gallery_labels = [], [], [], []
    for vectors, labels, domains, prefix in ((val_vectors, val_labels, val_domains, 'unseen'),
                                             (seen_vectors, seen_labels, seen_domains, 'seen')):
        for vector, label, domain in zip(vectors, labels, domains):
            (queries if domain == SKETCH else gallery).append(vector / np.linalg.norm(vector))
            (query_labels if domain == SKETCH else gallery_labels).append(f'{prefix}-{label}')
    names = sorted(set(query_labels) | set(gallery_labels))
    expected = reference_means(np.array(queries), np.array([names.index(q) for q in query_labels]),
                               np.array(gallery), np.array([names.index(g) for g in gallery_labels]))
    for name in (*METRIC_NAMES, 'precise'):
        assert ours[name] == pytest.approx(expected[name], abs=1e-9), name
    unseen_only = retrieval_metrics(val_vectors[val_domains == SKETCH], val_labels[val_domains == SKETCH],
                                    val_vectors[val_domains == PHOTO], val_labels[val_domains == PHOTO])
    assert ours['mAP@all'] != pytest.approx(unseen_only['mAP@all'], abs=1e-3)


def test_a_gzs_run_holds_its_seen_items_out_and_test_py_gives_its_numbers(tiny_data, tmp_path, capsys):
    train(parse_args(tiny(tiny_data, tmp_path, '--method', 'msedge', '--epochs', '2', '--warmup', '0', '--gzs',
                          '--heldout_fraction', '0.5')))
    prefix = 'synthetic_msedge_resnet50_8_gzs'
    rows = read_csv(tmp_path / f'{prefix}_results.csv')
    assert all(f'gzs_{m}' in rows[0] for m in (*METRIC_NAMES, 'precise'))
    checkpoint = load_torch(tmp_path / f'{prefix}_model.pth', CHECKPOINT_FORMAT, 'checkpoint')
    full = scan_split(tiny_data, 'synthetic', 'train')
    assert checkpoint['data']['train']['photos'] == full.count(PHOTO) // 2  # half of every class held out
    capsys.readouterr()
    metrics = retrieval.main(['--evaluate', '--gzs', '--data_base', str(tmp_path / f'{prefix}_model.pth'),
                              '--workers', '0', '--device', DEVICE])
    best = next(row for row in rows if int(row['epoch']) == checkpoint['epoch'])
    for name in ('mAP@all', 'P@100', 'precise'):
        assert metrics[f'gzs_{name}'] == pytest.approx(float(best[f'gzs_{name}']), abs=1e-5)
    assert 'GZS (seen and unseen classes)' in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- training-free

def test_training_free_features_are_the_backbones_pooled_features(tiny_data, capsys):
    images, domains = rng_images(4, 32, seed=3), torch.tensor([SKETCH, PHOTO, SKETCH, PHOTO])
    torch.manual_seed(0)
    acnet = get_method('acnet').training_free(Namespace(backbone_type='resnet18'), pretrained=False).eval()
    direct = timm.create_model('resnet18', pretrained=False, num_classes=8, global_pool='max')
    direct.load_state_dict(acnet.net.extractor.backbone.state_dict())
    with torch.no_grad():
        direct.eval()
        x = (images.float() / 255 - torch.tensor([.485, .456, .406]).view(1, 3, 1, 1)) / \
            torch.tensor([.229, .224, .225]).view(1, 3, 1, 1)
        maps = direct.forward_features(x)  # resnet18 takes ImageNet normalisation (not a seed backbone)
        expected = F.normalize(maps.amax(dim=(2, 3)), dim=1)
        assert torch.allclose(acnet.embed(images, domains), expected, atol=1e-5)
        torch.manual_seed(1)  # as test.py --seed 1 does: the command below builds the same random network
        msedge = get_method('msedge').training_free(Namespace(backbone_type='resnet18', edge_mode='none'),
                                                    pretrained=False).eval()
        features = timm.create_model('resnet18', pretrained=False, features_only=True, out_indices=(-3, -2, -1))
        features.load_state_dict(msedge.net.backbone.state_dict())
        top = features.eval()(x)[-1]
        assert torch.allclose(msedge.embed(images, domains), F.normalize(top.amax(dim=(2, 3)), dim=1), atol=1e-5)
    # the command's numbers are the metrics of those embeddings
    metrics = retrieval.main(['--evaluate', '--training_free', '--method', 'msedge', '--backbone_type', 'resnet18',
                              '--no_pretrained', '--edge_mode', 'none', '--data_root', str(tiny_data), '--data_name',
                              'synthetic', '--img_size', '32', '--workers', '0', '--device', DEVICE])
    val = scan_split(tiny_data, 'synthetic', 'val')
    from zs_sbir.images import load_image
    with torch.no_grad():
        vectors = msedge.to(DEVICE).embed(torch.stack([load_image(val.root / p, 32, 'bicubic') for p in val.paths])
                                          .to(DEVICE), torch.tensor(val.domains, device=DEVICE)).cpu()
    labels, kinds = torch.tensor(val.labels), torch.tensor(val.domains)
    reference = retrieval_metrics(vectors[kinds == SKETCH], labels[kinds == SKETCH], vectors[kinds == PHOTO],
                                  labels[kinds == PHOTO])
    assert metrics['precise'] == pytest.approx(reference['precise'], abs=1e-6)
    assert 'resnet18 (random init), no training' in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- ablations

def test_cross_entropy_head_is_04de2e0s_loss():
    torch.manual_seed(0)
    model = make_model('acnet', 3, 'resnet18', 8, pretrained=False, class_loss='ce').train()  # backbone BatchNorm frozen
    nets = training_nets(model)
    sketch, photo, labels = rng_images(2, 32, 1), rng_images(2, 32, 2), torch.tensor([0, 2])
    torch.manual_seed(1)
    with torch.no_grad():
        x = ACNet.to_input(torch.cat([sketch, photo]))
        raw = model.extractor(torch.cat([x[:2], x[2:], model.generator(x[:2])]))  # sketch, photo, fake: not normalised
        expected = F.cross_entropy(raw @ model.class_loss.fc.weight.T + model.class_loss.fc.bias, labels.repeat(3))
    assert raw.norm(dim=1).sub(1).abs().max() > 1e-2  # the head sees unnormalised embeddings
    losses_ = model.training_step(nets, model.make_optimizers(lr()), [sketch, photo, labels])
    assert losses_['class_loss'].item() == pytest.approx(expected.item(), rel=1e-4)
    with torch.no_grad():
        assert torch.allclose(model.eval().embed(photo, torch.tensor([PHOTO] * 2)).norm(dim=1), torch.ones(2))
    groups = model.make_optimizers(lr(1e-5))['extractor'].param_groups
    assert [g['lr'] for g in groups] == [1e-5, 1e-5]  # the head sat in the extractor, at its rate


@pytest.mark.parametrize('class_loss', ['normsoftmax', 'triplet'])
def test_extractor_only_baselines_train_the_extractor_alone(class_loss):
    torch.manual_seed(0)
    model = make_model('acnet', 3, 'resnet18', 8, pretrained=False, class_loss=class_loss, extractor_only=True)
    assert type(model).__name__ == 'ACNetExtractor' and not model.listed
    assert not hasattr(model, 'generator') and list(model.make_optimizers(lr())) == ['extractor']
    images, labels = rng_images(6, 32, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    domains = torch.tensor([SKETCH, PHOTO] * 3)
    bn = model.extractor.backbone.bn1
    before = bn.running_mean.clone()
    with torch.no_grad():
        embeddings = model.extractor.train()(ACNet.to_input(images))  # backbone, max pooling, head, L2 norm
        reference = losses.TripletMarginLoss() if class_loss == 'triplet' else losses.NormalizedSoftmaxLoss(3, 8)
        if class_loss == 'normsoftmax':
            reference.load_state_dict(model.class_loss.state_dict())
        expected = reference(embeddings, labels)
    assert not torch.equal(bn.running_mean, before)  # BatchNorm trains, as in the original baselines
    out = model.training_step(training_nets(model), model.make_optimizers(lr(1e-4)), [images, labels, domains, None])
    assert out['class_loss'].item() == pytest.approx(expected.item(), rel=1e-3)
    with torch.no_grad():  # sketches are embedded as they are: no generator
        assert torch.allclose(model.eval().embed(images, domains),
                              F.normalize(model.extractor(ACNet.to_input(images)), dim=1), atol=1e-6)
    args = parse_args(['--extractor_only', '--class_loss', class_loss])
    assert (args.lr, args.warmup) == (1e-4, 0) and run_prefix(args).endswith(f'_extractor-{class_loss}')


def test_every_ablation_is_one_command_with_its_own_files(tiny_data, tmp_path, capsys):
    prefixes = {run_prefix(parse_args(list(a['argv']))) for a in get_method('acnet').ablations}
    assert len(prefixes) == 6 and 'sketchy_acnet_resnet50_512_ce' in prefixes
    train(parse_args(tiny(tiny_data, tmp_path, '--epochs', '1', '--extractor_only', '--class_loss', 'triplet')))
    assert (tmp_path / 'synthetic_acnet_resnet50_8_extractor-triplet_model.pth').is_file()
    check_cli(capsys, train_main, tiny(tiny_data, tmp_path, '--class_loss', 'triplet'),
              'triplet is the extractor-only baseline of the original .*add --extractor_only')
    check_cli(capsys, train_main, tiny(tiny_data, tmp_path, '--extractor_only', '--loss_weights', '1', '0', '1'),
              "--extractor_only has none")
    check_cli(capsys, train_main, tiny(tiny_data, tmp_path, '--feature_levels', '1', '2', '4'),
              '--feature_levels applies to --method msedge only')


def test_reproduce_runs_the_ablation_set_and_tables_gzs(tmp_path, capsys):
    grid = reproduce.grid(reproduce.parse_args(['--datasets', 'sketchy', '--backbones', 'resnet50', 'vgg16',
                                                '--emb_dims', '512', '--ablations', '--methods', 'acnet', 'msedge']))
    names = [run_prefix(args) for _, args in grid]
    assert len(names) == len(set(names)) == 2 * 7 + 2 + 1  # MSEdge's 1 2 4 levels are ResNet50's only
    everyone = [run_prefix(args) for _, args in reproduce.grid(reproduce.parse_args(
        ['--datasets', 'sketchy', 'tuberlin', '--ablations', '--metric_convention', 'torchmetrics']))]
    for name in names + everyone + [n + '_gzs' for n in names]:
        method, parsed = reproduce.parse_run_name(f'{name}_results.csv')
        assert name.startswith(f"{parsed['dataset']}_{method}_{parsed['backbone']}_{parsed['dim']}"), name
    fake_run(tmp_path, 'synthetic_msedge_resnet50_512_gzs', [0.3, 0.5])
    path = tmp_path / 'synthetic_msedge_resnet50_512_gzs_results.csv'
    rows = read_csv(path)
    for row in rows:
        row.update({f'gzs_{m}': float(row['precise']) / 2 for m in METRIC_NAMES})
        row.update(gzs_seen_sketches=40, gzs_seen_photos=200, gzs_protocol_sketches=40, gzs_protocol_photos=200)
    from zs_sbir.safe_files import write_csv
    write_csv(rows, path)
    table = reproduce.build_table(reproduce.best_rows(tmp_path)).splitlines()
    assert 'GZS mAP@200' in table[0] and '| msedge gzs (ours) | resnet50 | 512 | test | sake | 50.0 | 50.0 | 50.0 | 50.0 | ' \
        '25.0 | 25.0 | 25.0 | 25.0 |' in table
    for row in rows:  # only 60 seen photos were held out: the GZS cells are marked and the note says by how much
        row['gzs_seen_photos'] = 60
    write_csv(rows, path)
    table = reproduce.build_table(reproduce.best_rows(tmp_path))
    assert '| 50.0 | 25.0‡ | 25.0‡ | 25.0‡ | 25.0‡ |' in table
    assert ("‡ GZS with fewer seen items than the protocol's 20 % (fewer were held out of training): msedge gzs on "
            'generated dataset: 40 of 40 sketches and 60 of 200 photos') in table
    fake_run(tmp_path, 'synthetic_acnet_resnet50_512_extractor-triplet', [0.2])  # an ablation: its source under the table
    fake_run(tmp_path, 'synthetic_msedge_resnet50_512_levels-1-2-4_heldout', [0.2], select_on='heldout',
             heldout=[0.1])  # with a common suffix after the variant's own
    table = reproduce.build_table(reproduce.best_rows(tmp_path))
    assert ("acnet extractor-triplet: the original's c9ca544 ablation/triplet.py; msedge levels-1-2-4: the original's "
            'EGFF 75d71f0') in table


# ----------------------------------------------------------------------------------------------- MSEdge levels

def test_msedge_feature_levels_of_the_last_edge_fusion_commit():
    default = make_model('msedge', 2, 'resnet50', 8, pretrained=False)
    layer124 = make_model('msedge', 2, 'resnet50', 8, pretrained=False, feature_levels=(1, 2, 4))
    assert default.backbone.feature_info.channels() == [512, 1024, 2048] and default.head.proj.in_features == 3584
    assert layer124.backbone.feature_info.channels() == [256, 512, 2048] and layer124.head.proj.in_features == 2816
    assert layer124.backbone.feature_info.reduction() == [4, 8, 32]
    with torch.no_grad():
        embeddings, (a3, a4) = layer124.eval()(rng_images(2, 64), torch.tensor([SKETCH, PHOTO]))
    assert embeddings.shape == (2, 8) and a3.shape[-1] == 16 and a4.shape[-1] == 8  # layer1 and layer2 maps
    assert run_prefix(parse_args(['--method', 'msedge', '--feature_levels', '1', '2', '4'])).endswith('_levels-1-2-4')
    assert run_prefix(parse_args(['--method', 'msedge', '--feature_levels', '2', '3', '4'])) == \
        'sketchy_msedge_resnet50_512'  # the default: no suffix


def test_a_smaller_seen_pool_is_said_and_sampled_epochs_sample_the_seen_queries_alike(tmp_path, capsys):
    def split(sketches, photos):
        return Split(tmp_path, ['a'], [f'x{i}' for i in range(sketches + photos)], [0] * (sketches + photos),
                     [SKETCH] * sketches + [PHOTO] * photos)
    val = split(10, 20)  # the protocol adds int(0.2 x 10) = 2 sketches and int(0.2 x 20) = 4 photos
    assert gzs_shortfall(split(2, 4), val) == ''
    assert gzs_shortfall(split(2, 3), val) == (" (fewer than the protocol's 20 %, 2 sketches and 4 photos: fewer were "
                                               'held out of training; train with a larger --heldout_fraction to hold out more)')

    data = tmp_path / 'data'
    make_synthetic(data, **{**TINY, 'num_sketches': 10})  # val: 20 sketches, 12 photos; GZS adds 4 and 2
    train(parse_args(tiny(data, tmp_path / 'run', '--epochs', '1', '--gzs', '--heldout_fraction', '0.5',
                          '--eval_queries', '10')))
    out = capsys.readouterr().out
    assert 'GZS: 4 seen sketches and 2 seen photos join the unseen test set\n' in out
    assert 'each epoch, GZS: 2 of the 4 seen sketches' in out  # 10 of 20 unseen queries: half of the seen ones too
    prefix = tmp_path / 'run' / 'synthetic_acnet_resnet50_8_gzs'
    final = read_csv(f'{prefix}_results.csv')[-1]
    assert final['eval_queries'] == 'all'
    assert [int(final[f'gzs_{k}_{d}']) for k in ('seen', 'protocol') for d in ('sketches', 'photos')] == [4, 2, 4, 2]
    metrics = retrieval.main(['--evaluate', '--gzs', '--data_base', f'{prefix}_model.pth', '--workers', '0',
                              '--device', DEVICE])
    assert metrics['gzs_precise'] == pytest.approx(float(final['gzs_precise']), abs=1e-5)  # all seen queries
