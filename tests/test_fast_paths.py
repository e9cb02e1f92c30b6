"""The speed paths change nothing beyond float tolerance: channels_last, the image cache, tensor
augmentations, bf16 autocast and torch.compile, each against the plain path."""
import pytest
import torch

from helpers import BITWISE, DEVICE, lr, make_model, private_copy, rng_images
from methods import get_method
from train import train
from utils import PHOTO, SKETCH, scan_split
from zs_sbir.cli import DataError
from zs_sbir.config import parse_args
from zs_sbir.image_cache import CachedImages, build_cache, cache_path
from zs_sbir.images import FileImages
from zs_sbir.safe_files import read_csv
from zs_sbir.training import compile_model, training_nets

DOMAINS = torch.tensor([SKETCH, PHOTO, SKETCH, PHOTO])


def models():
    torch.manual_seed(0)
    return [make_model('acnet', 3, 'resnet50', 16, pretrained=False).eval(), make_model('msedge', 3, 'vgg16', 16, pretrained=False).eval(),
            make_model('msedge', 3, 'resnet50', 16, pretrained=False).eval()]


@torch.no_grad()
def test_channels_last_gives_the_same_embeddings():
    images = rng_images(4, 64)
    for model in models():
        plain = model.embed(images, DOMAINS)
        model.to(memory_format=torch.channels_last)
        fast = model.embed(images.contiguous(memory_format=torch.channels_last), DOMAINS)
        assert torch.allclose(plain, fast, atol=1e-4), model.name


@torch.no_grad()
@pytest.mark.parametrize('device', sorted({'cpu', DEVICE}))
def test_bf16_autocast_stays_close(device):
    images, domains = rng_images(4, 64).to(device), DOMAINS.to(device)
    for model in models():
        model.to(device)
        plain = model.embed(images, domains)
        with torch.autocast(torch.device(device).type, torch.bfloat16):
            fast = model.embed(images, domains).float()
        assert torch.nn.functional.cosine_similarity(plain, fast).min() > 0.98, model.name


@pytest.mark.parametrize('method', ['acnet', 'msedge'])
def test_augmentations_at_p0_are_the_identity(method):
    images = rng_images(3, 32)
    assert all(torch.equal(get_method(method).train_transform(p=0)(image), image) for image in images)
    flipped = get_method('acnet').train_transform(p=1)(images[0])
    assert torch.equal(flipped, images[0].flip(-1))


def test_cache_holds_exactly_the_decoded_images(tiny_data, tmp_path):
    tiny_data = private_copy(tiny_data, tmp_path)
    for method in ('acnet', 'msedge'):
        interpolation = get_method(method).interpolation
        build_cache(tiny_data, 'synthetic', 32, interpolation, workers=2)
        for split_name in ('train', 'val'):
            split = scan_split(tiny_data, 'synthetic', split_name)
            cached = CachedImages(tiny_data, 'synthetic', split_name, split, 32, method, interpolation)
            files = FileImages(split.root, split.paths, 32, interpolation)
            assert len(cached) == len(files)
            assert all(torch.equal(cached[i], files[i]) for i in range(len(files)))


@pytest.mark.parametrize('method', ['acnet', 'msedge'])
def test_training_from_the_cache_gives_the_same_results(tiny_data, tmp_path, method):
    tiny_data = private_copy(tiny_data, tmp_path / 'data')
    build_cache(tiny_data, 'synthetic', 32, get_method(method).interpolation, workers=2)
    rows = []
    for name, extra in (('files', []), ('cache', ['--cache'])):
        train(parse_args(['--method', method, '--data_root', str(tiny_data), '--data_name', 'synthetic',
                          '--no_pretrained', '--img_size', '32', '--batch_size', '8', '--epochs', '1', '--warmup', '0',
                          '--workers', '0', '--emb_dim', '8', *BITWISE, '--save_root', str(tmp_path / name),
                          *extra]))
        rows.append(read_csv(tmp_path / name / f'synthetic_{method}_resnet50_8_results.csv'))
    assert rows[0] == rows[1]


def test_missing_or_stale_cache_is_a_clear_error(tiny_data, tmp_path):
    tiny_data = private_copy(tiny_data, tmp_path)
    split = scan_split(tiny_data, 'synthetic', 'val')
    with pytest.raises(DataError, match=r'no image cache at .*prepare.py cache .*--img_size 48 --method msedge'):
        CachedImages(tiny_data, 'synthetic', 'val', split, 48, 'msedge', 'bicubic')
    build_cache(tiny_data, 'synthetic', 32, 'bilinear', workers=1)
    assert cache_path(tiny_data, 'synthetic', 'val', 32, 'bilinear').is_file()
    subset = split.subset([0, 3, 5])  # a subset of a split reads its own rows
    cached = CachedImages(tiny_data, 'synthetic', 'val', subset, 32, 'acnet', 'bilinear')
    assert torch.equal(cached[1], FileImages(split.root, split.paths, 32, 'bilinear')[3])
    split.paths[2] = 'photo/new-class/new.png'  # an image the cache has never seen
    with pytest.raises(DataError, match=r'does not match the val folder \(1 images are not in it\): rebuild'):
        CachedImages(tiny_data, 'synthetic', 'val', split, 32, 'acnet', 'bilinear')


@torch.no_grad()
def test_compiled_networks_give_the_same_outputs():
    torch.manual_seed(0)
    model = make_model('acnet', 3, 'resnet50', 16, pretrained=False).eval()
    x = model.to_input(rng_images(4, 32))
    plain = model.generator(x)
    compile_model(model)  # compiles lazily: only the generator is exercised here, to keep the test short
    assert list(model.state_dict()) == list(make_model('acnet', 3, 'resnet50', 16, pretrained=False).state_dict())
    assert torch.allclose(model.generator(x), plain, atol=1e-4)


@pytest.mark.parametrize('method', ['acnet', 'msedge'])
def test_compiled_bf16_training_steps_match_eager(method):
    """--amp --compile: two training steps give the eager bf16 losses, and no NaN. (Inductor used to fuse away
    a bf16 rounding before the max-pooling backward's tie count: MSEdge got NaN gradients at its first step.)"""
    images, labels = rng_images(8, 32, seed=5).to(DEVICE), torch.arange(8, device=DEVICE) % 4
    batch = ([images[:4], images[4:], labels[:4]] if method == 'acnet' else
             [images, labels, torch.arange(8, device=DEVICE) % 2, torch.arange(8, device=DEVICE)])
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = make_model(method, 4, 'resnet18', 16, pretrained=False).to(DEVICE).train()
        model.set_warmup(False)
        if compiled:
            compile_model(model)
        nets, optimizers = training_nets(model, amp=True), model.make_optimizers(lr(1e-4))
        runs.append([{k: v.item() for k, v in model.training_step(nets, optimizers, batch).items()} for _ in range(2)])
        assert all(torch.isfinite(p).all() for p in model.parameters()), f'compiled {compiled}: non-finite weights'
    eager, compiled = runs
    for a, b in zip(eager, compiled):
        assert b == pytest.approx(a, rel=0.05, abs=1e-3)
