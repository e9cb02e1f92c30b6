"""The method registry (methods/): a toy method, registered from inside this test and nowhere else, trains with
train.py, is scored by test.py --evaluate, indexed and queried by search.py and planned by reproduce.py, with
its numbers checked against the toy's formula computed here by hand; no command compares a method's name with a
string; every registered method keeps its promises (unit embeddings, pictures it says it draws)."""
import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reproduce
import search
import test as retrieval
from helpers import DEVICE, ROOT, build, check_cli, lr, make_model, rng_images, tiny
from methods import Method, create_model, get_method, method_names, registry, register_method
from train import main as train_main
from utils import PHOTO, SKETCH, retrieval_metrics, scan_split
from zs_sbir.checkpoint import CHECKPOINT_FORMAT, VECTORS_FORMAT, load_torch
from zs_sbir.images import load_image
from zs_sbir.safe_files import read_csv
from zs_sbir.training import training_nets

POOL = 4  # the toy embeds 4x4 average-pooled pixels


def toy_embedding(state, images):
    """The toy's embedding computed from its formula: a linear map of 4x4-pooled pixels, L2-normalised (NumPy)."""
    x = images.double().numpy() / 255
    n, c, h, w = x.shape
    pooled = x.reshape(n, c, POOL, h // POOL, POOL, w // POOL).mean(axis=(3, 5)).reshape(n, -1)
    out = pooled @ state['proj.weight'].double().numpy().T + state['proj.bias'].double().numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture()
def toy(monkeypatch):
    """Register the toy method for this test only (the registry is restored afterwards)."""
    monkeypatch.setattr(registry, '_REGISTRY', dict(registry._REGISTRY))

    @register_method
    class Toy(Method):
        """A linear embedding of raw pixels, trained with a softmax over class proxies."""
        name = 'toy'
        defaults = dict(Method.defaults, backbone_type='pixels', emb_dim=6)

        def __init__(self, classes, emb_dim, img_size):
            super().__init__()
            self.proj = nn.Linear(3 * POOL * POOL, emb_dim)
            self.proxies = nn.Parameter(torch.randn(len(classes), emb_dim))
            self.img_size = img_size

        def forward(self, images, domains):
            return F.normalize(self.proj(F.adaptive_avg_pool2d(images.float() / 255, POOL).flatten(1)), dim=-1)

        embed = forward

        def make_optimizers(self, options, fused=None):
            return {'model': torch.optim.Adam(self.parameters(), lr=options.lr)}

        def training_step(self, nets, optimizers, batch):
            images, labels, domains, _ = batch
            with nets.autocast():
                embeddings = nets.model(images, domains)
            loss = F.cross_entropy(10 * embeddings.float() @ F.normalize(self.proxies, dim=-1).T, labels)
            optimizers['model'].zero_grad(set_to_none=True)
            loss.backward()
            optimizers['model'].step()
            return {'proxy_loss': loss.detach()}
    return Toy


def test_a_method_registered_in_a_test_runs_through_every_command(toy, tiny_data, tmp_path, capsys):
    assert 'toy' in method_names() and get_method('toy') is toy
    train_main(tiny(tiny_data, tmp_path, '--method', 'toy', '--epochs', '3', '--emb_dim', '6'))
    prefix = tmp_path / 'synthetic_toy_pixels_6'
    rows = read_csv(f'{prefix}_results.csv')
    assert [r['epoch'] for r in rows] == ['1', '2', '3'] and 'proxy_loss' in rows[0]
    checkpoint = load_torch(f'{prefix}_model.pth', CHECKPOINT_FORMAT, 'checkpoint')
    assert checkpoint['method'] == 'toy' and checkpoint['args']['img_size'] == 32

    # the saved embeddings are the toy's formula applied to the val images, and give the logged metrics
    val = scan_split(tiny_data, 'synthetic', 'val')
    images = torch.stack([load_image(val.root / p, 32, 'bilinear') for p in val.paths])
    expected = toy_embedding(checkpoint['model'], images)
    vectors = load_torch(f'{prefix}_vectors.pth', VECTORS_FORMAT, 'vectors')
    assert vectors['paths'] == val.paths and np.abs(vectors['vectors'].numpy() - expected).max() < 1e-5
    domains, labels = np.array(val.domains), np.array(val.labels)
    by_hand = retrieval_metrics(expected[domains == SKETCH], labels[domains == SKETCH], expected[domains == PHOTO],
                                labels[domains == PHOTO])
    best = max(rows, key=lambda r: float(r['precise']))
    assert float(best['precise']) == pytest.approx(by_hand['precise'], abs=1e-6)

    # test.py --evaluate scores the checkpoint again
    metrics = retrieval.main(['--evaluate', '--data_base', f'{prefix}_model.pth', '--workers', '0', '--device', DEVICE])
    assert metrics['precise'] == pytest.approx(by_hand['precise'], abs=1e-6)

    # search.py: the index holds the toy's photo embeddings; a query ranks them by the toy's products
    photos = val.root / 'photo'
    build(f'{prefix}_model.pth', photos, tmp_path / 'index')
    query = val.root / val.paths[val.domains.index(SKETCH)]
    answers = search.main(['query', '--index', str(tmp_path / 'index'), '--query_name', str(query), '--num', '4',
                           '--save_root', str(tmp_path / 'pictures'), '--device', DEVICE])
    files = sorted(photos.rglob('*.jpg'))
    gallery = toy_embedding(checkpoint['model'], torch.stack([load_image(f, 32, 'bilinear') for f in files]))
    q = toy_embedding(checkpoint['model'], load_image(query, 32, 'bilinear')[None])[0]
    order = sorted(range(len(files)), key=lambda i: (-(gallery[i] @ q), i))[:4]
    assert [hit.path.name for hit in answers[0]] == [files[i].name for i in order]

    # reproduce.py plans the toy's runs like any other method's
    capsys.readouterr()
    reproduce.main(['--methods', 'toy', '--backbones', 'pixels', '--emb_dims', '6', '--datasets', 'synthetic',
                    '--dry_run', '--save_root', str(tmp_path / 'grid')])
    planned = [line for line in capsys.readouterr().out.splitlines() if 'train.py' in line]
    assert len(planned) == 1 and '--method toy --backbone_type pixels --emb_dim 6' in planned[0]


def test_the_options_of_other_methods_are_refused_for_a_new_one(toy, tiny_data, tmp_path, capsys):
    check_cli(capsys, train_main, tiny(tiny_data, tmp_path, '--method', 'toy', '--edge_mode', 'photo'),
              '--edge_mode applies to --method msedge only')
    check_cli(capsys, train_main, tiny(tiny_data, tmp_path, '--method', 'toy', '--grad_checkpointing'),
              '--grad_checkpointing: toy offers no gradient checkpointing')
    check_cli(capsys, retrieval.main, ['--evaluate', '--training_free', '--method', 'toy', '--data_root', tiny_data,
                                       '--data_name', 'synthetic'], '--training_free: toy has no training-free baseline')
    assert not (tmp_path / 'synthetic_toy_pixels_6_results.csv').exists()


# ----------------------------------------------------------------------------------------------- the built-in ones

@pytest.mark.parametrize('name, options', [('acnet', {}), ('acnet', {'class_loss': 'ce'}),
                                           ('acnet', {'extractor_only': True}), ('msedge', {}),
                                           ('msedge', {'edge_mode': 'photo'})])
def test_every_method_embeds_unit_vectors_and_draws_what_it_says(name, options):
    torch.manual_seed(0)
    model = make_model(name, 3, 'resnet18', 8, pretrained=False, **options).eval()
    images = rng_images(4, 32)
    with torch.no_grad():
        embeddings = model.embed(images, torch.tensor([SKETCH, PHOTO, SKETCH, PHOTO]))
        drawn = {domain: model.pictures(images, domain) for domain in (SKETCH, PHOTO)}
    assert embeddings.shape == (4, 8) and torch.allclose(embeddings.norm(dim=1), torch.ones(4), atol=1e-5)
    names = set(drawn[SKETCH]) | set(drawn[PHOTO])
    assert names == set(model.draws) and set(model.optional_pictures) <= names
    for pictures in drawn.values():
        for value in pictures.values():
            assert len(value) == 4 and (value.dtype == torch.uint8 and value.shape[1] == 3 or value.ndim == 3)


def test_a_variant_is_reached_through_its_options_and_records_its_method():
    assert get_method('acnet', {'extractor_only': True}).name == 'acnet_extractor'
    assert 'acnet_extractor' not in method_names() and 'acnet_extractor' in method_names(listed=False)
    model = create_model('acnet', ['a', 'b'], {'extractor_only': True, 'backbone_type': 'resnet18', 'emb_dim': 8},
                         pretrained=False)
    optimizers = model.make_optimizers(lr(1e-4))
    assert list(model.trained_parts()) == ['extractor', 'class_loss'] and list(optimizers) == ['extractor']
    nets = training_nets(model)
    assert set(nets.parts) == {'extractor', 'class_loss'}


# ----------------------------------------------------------------------------------------------- one way in

LIBRARY = [p for p in [*ROOT.glob('*.py'), *ROOT.glob('zs_sbir/*.py')]]


def name_comparisons(path, names):
    """Where a file compares a method's name with a string, or looks one up in a table keyed by method names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        constants = []
        if isinstance(node, ast.Compare):
            constants = [n for n in [node.left, *node.comparators] if isinstance(n, ast.Constant)]
            constants += [e for n in node.comparators if isinstance(n, (ast.Tuple, ast.List, ast.Set))
                          for e in n.elts if isinstance(e, ast.Constant)]
        elif isinstance(node, ast.Dict):
            constants = [k for k in node.keys if isinstance(k, ast.Constant)]
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            constants = [node.slice]
        found += [f'{path.name}:{c.lineno} {c.value!r}' for c in constants if c.value in names]
    return found


def test_no_command_or_library_file_compares_a_method_name():
    names = set(method_names(listed=False))
    assert {'acnet', 'msedge', 'acnet_extractor'} <= names
    found = [hit for path in LIBRARY for hit in name_comparisons(path, names)]
    assert found == [], found
    # the check itself finds what it looks for
    probe = ROOT / 'tests' / 'fixtures' / 'compares_a_method.txt'
    assert len(name_comparisons(probe, names)) == 3


def test_every_method_lives_in_a_file_named_for_it():
    for name in method_names(listed=False):
        assert Path(get_method(name).__module__.replace('.', '/') + '.py').stem == name, name
        assert re.fullmatch(r'methods\.\w+', get_method(name).__module__)
