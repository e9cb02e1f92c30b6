"""convert.py: the ACNet authors' released state dicts, rebuilt here from the original code's layer names and
shapes, give the same embeddings as a direct re-creation of the original forward pass; test.py evaluates
and queries the converted checkpoint; files that do not fit fail with one line."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import convert
import test as retrieval
from helpers import DEVICE, cli_checker, rng_images
from zs_sbir.retrieval import model_from_checkpoint
from zs_sbir.checkpoint import CHECKPOINT_FORMAT, load_torch
from zs_sbir.images import load_image
from utils import METRIC_NAMES, PHOTO, SKETCH, retrieval_metrics, scan_split


# The original code's networks, written again on purpose: an independent reference that the released
# state dicts must load into, so these repeat the shape of model.py's Generator (duplicates reports it).
class OriginalResidualBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, padding_mode='reflect'), nn.InstanceNorm2d(c),
                                  nn.ReLU(inplace=True), nn.Conv2d(c, c, 3, padding=1, padding_mode='reflect'),
                                  nn.InstanceNorm2d(c))

    def forward(self, x):
        return x + self.conv(x)


class OriginalGenerator(nn.Module):
    """The original model.py's Generator(in_channels=8, num_block=8), module for module."""

    def __init__(self, c=8, blocks=8):
        super().__init__()
        self.in_conv = nn.Sequential(nn.Conv2d(3, c, 7, padding=3, padding_mode='reflect'), nn.InstanceNorm2d(c),
                                     nn.ReLU(inplace=True))
        down, up = [], []
        for _ in range(2):
            down += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * c), nn.ReLU(inplace=True)]
            c *= 2
        self.down_sample = nn.Sequential(*down)
        self.convs = nn.Sequential(*[OriginalResidualBlock(c) for _ in range(blocks)])
        for _ in range(2):
            up += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1),
                   nn.InstanceNorm2d(c // 2), nn.ReLU(inplace=True)]
            c //= 2
        self.up_sample = nn.Sequential(*up)
        self.out_conv = nn.Sequential(nn.Conv2d(c, 3, 7, padding=3, padding_mode='reflect'), nn.Tanh())

    def forward(self, x):
        return self.out_conv(self.up_sample(self.convs(self.down_sample(self.in_conv(x)))))


class OriginalExtractor(nn.Module):
    def __init__(self, name, emb_dim):
        super().__init__()
        self.backbone = timm.create_model(name, pretrained=False, num_classes=emb_dim, global_pool='max')

    def forward(self, x):
        return F.normalize(self.backbone(x), dim=-1)


def original_embed(extractor, generator, images, domains):
    """The original test-time pipeline: ToTensor + Normalize(0.5, 0.5); photos E(x), sketches E(G(x))."""
    x = (images.float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        return torch.stack([extractor((generator(x[i:i + 1]) if d == SKETCH else x[i:i + 1]))[0]
                            for i, d in enumerate(domains.tolist())])


def released(tmp_path, backbone, emb_dim, seed=0):
    """Random 'released' files with the original names; returns (paths, the original networks)."""
    torch.manual_seed(seed)
    extractor, generator = OriginalExtractor(backbone, emb_dim).eval(), OriginalGenerator().eval()
    paths = tmp_path / f'synthetic_{backbone}_{emb_dim}_extractor.pth', tmp_path / f'synthetic_{backbone}_{emb_dim}_generator.pth'
    torch.save(extractor.state_dict(), paths[0])
    torch.save(generator.state_dict(), paths[1])
    return paths, extractor, generator


def convert_args(paths, backbone, emb_dim, save, *extra):
    return ['--extractor', str(paths[0]), '--generator', str(paths[1]), '--backbone_type', backbone,
            '--emb_dim', str(emb_dim), '--save', str(save), *extra]


@pytest.mark.parametrize('backbone, emb_dim', [('resnet50', 16), ('vgg16', 8)])
def test_converted_model_embeds_like_the_original(tmp_path, backbone, emb_dim):
    paths, extractor, generator = released(tmp_path, backbone, emb_dim)
    checkpoint = convert.convert(convert.parse_args(convert_args(paths, backbone, emb_dim, tmp_path / 'x_model.pth')))
    assert checkpoint['parts'] == ['generator', 'extractor'] and checkpoint['args']['backbone_type'] == backbone
    model = model_from_checkpoint(load_torch(tmp_path / 'x_model.pth', CHECKPOINT_FORMAT, 'checkpoint'))
    images, domains = rng_images(4, 64, seed=7), torch.tensor([SKETCH, PHOTO, SKETCH, PHOTO])
    with torch.no_grad():
        ours = model.embed(images, domains)
    assert (ours - original_embed(extractor, generator, images, domains)).abs().max() < 1e-5


def test_test_py_evaluates_and_queries_a_converted_release(tmp_path, tiny_data, capsys):
    paths, extractor, generator = released(tmp_path, 'resnet50', 16, seed=1)
    save = tmp_path / 'x_model.pth'
    convert.main(convert_args(paths, 'resnet50', 16, save, '--img_size', '32', '--data_root', str(tiny_data)))
    assert 'next: python test.py --evaluate' in capsys.readouterr().out

    # --evaluate: exact metrics of the original networks on the val split
    metrics = retrieval.main(['--evaluate', '--data_base', str(save), '--workers', '0', '--device', DEVICE])
    split = scan_split(tiny_data, 'synthetic', 'val')
    images = torch.stack([load_image(split.root / p, 32, 'bilinear') for p in split.paths])
    domains, labels = torch.tensor(split.domains), torch.tensor(split.labels)
    vectors = original_embed(extractor.to(DEVICE), generator.to(DEVICE), images.to(DEVICE), domains).cpu()
    expected = retrieval_metrics(vectors[domains == SKETCH], labels[domains == SKETCH],
                                 vectors[domains == PHOTO], labels[domains == PHOTO])
    for name in METRIC_NAMES:
        assert metrics[name] == pytest.approx(expected[name], abs=1e-6), name
    assert 'training log' not in capsys.readouterr().out  # a release has no training log

    # pictures: the gallery is embedded on the fly and ranked as the original networks rank it
    query = split.root / split.paths[split.domains.index(SKETCH)]
    retrieval.main(['--data_base', str(save), '--query_name', str(query), '--num', '3', '--save_root',
                    str(tmp_path / 'pictures'), '--workers', '0', '--device', DEVICE])
    out = capsys.readouterr().out
    assert 'has no saved gallery: embedding the' in out and (tmp_path / 'pictures' / f'{query.stem}.png').is_file()
    photos = domains == PHOTO
    similarity = vectors[photos] @ vectors[split.paths.index(str(query.relative_to(split.root)))]
    top = [split.paths[i] for i in photos.nonzero()[:, 0][similarity.argsort(descending=True)[:3]]]
    printed = [line.split()[-1] for line in out.splitlines() if line.startswith('    ')]
    assert [p.split('/val/', 1)[1] for p in printed] == top


check_error = cli_checker(convert.main, literal=True)


def test_files_that_do_not_fit_fail_with_one_line(tmp_path, capsys):
    paths, _, _ = released(tmp_path, 'resnet50', 16)
    save = tmp_path / 'out.pth'
    check_error(capsys, convert_args(paths, 'vgg16', 16, save), "looks like a resnet50 extractor, not a vgg16 ACNet "
                                                                "extractor: pass --backbone_type resnet50")
    check_error(capsys, convert_args(paths, 'resnet50', 512, save), 'holds 16-d embeddings: pass --emb_dim 16')
    check_error(capsys, convert_args(paths[::-1], 'resnet50', 16, save), 'swap --extractor and --generator')
    state = torch.load(paths[0])
    del state['backbone.layer2.0.conv1.weight']
    torch.save(state, tmp_path / 'partial.pth')
    check_error(capsys, convert_args((tmp_path / 'partial.pth', paths[1]), 'resnet50', 16, save),
                'is not a resnet50 ACNet extractor: 1 of its 320 tensors are missing and 0 unexpected '
                '(lacks backbone.layer2.0.conv1.weight)')
    torch.save([torch.zeros(1)], tmp_path / 'list.pth')
    check_error(capsys, convert_args((tmp_path / 'list.pth', paths[1]), 'resnet50', 16, save),
                "list.pth' is not a state dict (a dict of tensors) but a list")
    (tmp_path / 'notes.pth').write_text('not a checkpoint')
    check_error(capsys, convert_args((paths[0], tmp_path / 'notes.pth'), 'resnet50', 16, save),
                "notes.pth' cannot be read as a released checkpoint")
    check_error(capsys, convert_args((tmp_path / 'missing.pth', paths[1]), 'resnet50', 16, save),
                'released checkpoint not found')
    check_error(capsys, convert_args(paths, 'resnet5', 16, save), "timm has no model 'resnet5'")
    assert not save.exists()
    save.write_bytes(b'earlier work')
    check_error(capsys, convert_args(paths, 'resnet50', 16, save), 'exists: pass --overwrite')
    assert save.read_bytes() == b'earlier work'


def test_convert_never_replaces_its_own_input(tmp_path, capsys):
    paths, _, _ = released(tmp_path, 'resnet50', 16)
    for save, option in ((paths[0], 'extractor'), (paths[1], 'generator')):
        check_error(capsys, convert_args(paths, 'resnet50', 16, save, '--overwrite'),
                    f"is the --{option} file: converting never replaces a released file", unchanged=[tmp_path])


def test_the_files_of_one_release_are_needed(tmp_path, capsys):
    paths, _, _ = released(tmp_path, 'resnet50', 16)
    check_error(capsys, ['--save', tmp_path / 'out.pth'], 'name the released files of one method (acnet: --extractor '
                                                          'and --generator; clipprompt: --clipprompt)')
    check_error(capsys, [*convert_args(paths, 'resnet50', 16, tmp_path / 'out.pth'), '--clipprompt', paths[0]],
                'name the released files of one method')
    check_error(capsys, ['--extractor', paths[0], '--save', tmp_path / 'out.pth'], '--extractor and --generator go '
                                                                                   'together')
