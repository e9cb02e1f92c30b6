"""Networks of both methods: shapes, architecture, edge maps, warm-up, and one training step per method
checked against gradients computed independently from SPEC.md's loss formulas."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import rng_images
from model import (ACNet, Discriminator, Generator, MSEdge, UserError, create_backbone, edge_mask,
                   model_from_checkpoint, sobel_edges)
from train import acnet_step, msedge_step, training_nets
from utils import PHOTO, SKETCH


@pytest.fixture(scope='module')
def acnet():
    torch.manual_seed(0)
    return ACNet(num_classes=3, backbone_type='resnet50', emb_dim=16, pretrained=False)


@pytest.fixture(scope='module')
def msedge():
    torch.manual_seed(0)
    return MSEdge(num_classes=3, backbone_type='resnet50', emb_dim=16, pretrained=False)


# ------------------------------------------------------------------------------------- ACNet

@pytest.mark.parametrize('size', [32, 64])
def test_generator_keeps_size_and_range(size):
    generator = Generator()
    x = torch.rand(2, 3, size, size) * 2 - 1
    out = generator(x)
    assert out.shape == x.shape
    assert out.min() >= -1 and out.max() <= 1


def test_generator_and_discriminator_follow_spec():
    g = Generator()
    convs = [m for m in g.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs[:3]] == \
        [(3, 8, 7, 1), (8, 16, 3, 2), (16, 32, 3, 2)]
    assert convs[0].padding_mode == 'reflect' and convs[-1].padding_mode == 'reflect'
    assert sum(type(m).__name__ == 'ResidualBlock' for m in g.modules()) == 8
    ups = [c for c in convs if isinstance(c, nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels, c.padding[0], c.output_padding[0]) for c in ups] == \
        [(32, 16, 1, 1), (16, 8, 1, 1)]
    assert (convs[-1].in_channels, convs[-1].out_channels, convs[-1].kernel_size[0]) == (8, 3, 7)
    assert isinstance(list(g)[-1], nn.Tanh)
    d = Discriminator()
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == \
        [(3, 8, 4, 2, 1), (8, 16, 4, 2, 1), (16, 32, 4, 2, 1), (32, 64, 4, 1, 1), (64, 1, 4, 1, 1)]
    assert sum(isinstance(m, nn.InstanceNorm2d) for m in d.modules()) == 3
    assert d(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)


@pytest.mark.parametrize('backbone, size', [('resnet50', 32), ('vgg16', 32), ('resnet50', 64)])
def test_acnet_embeddings_shape_and_norm(backbone, size):
    torch.manual_seed(0)
    model = ACNet(num_classes=4, backbone_type=backbone, emb_dim=24, pretrained=False).eval()
    images, domains = rng_images(4, size), torch.tensor([SKETCH, PHOTO, SKETCH, PHOTO])
    with torch.no_grad():
        emb = model.embed(images, domains)
        assert emb.shape == (4, 24)
        assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
        # sketches go through the generator first, photos do not
        x = model.to_input(images)
        assert torch.allclose(emb[1], model.extractor(x[1:2])[0], atol=1e-5)
        assert torch.allclose(emb[0], model.extractor(model.generator(x[0:1]))[0], atol=1e-5)


def test_acnet_warmup_freezes_the_backbone_only(acnet):
    acnet.set_warmup(True)
    frozen = {n for n, p in acnet.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in acnet.named_parameters() if n.startswith('extractor.backbone.')}
    assert all(p.requires_grad for p in acnet.extractor.fc.parameters())
    acnet.set_warmup(False)
    assert all(p.requires_grad for p in acnet.parameters())


def test_acnet_backbone_batchnorm_stays_in_eval(acnet):
    acnet.train()
    norms = [m for m in acnet.extractor.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert acnet.generator.training and acnet.extractor.fc.training
    before = norms[0].running_mean.clone()
    acnet.extractor(torch.randn(2, 3, 32, 32))
    assert torch.equal(before, norms[0].running_mean)


def _acnet_reference_grads(model, sketch, photo, labels):
    """Gradients of SPEC's losses, computed literally: three separate E calls, three NS losses."""
    x_sketch, x_photo = model.to_input(sketch), model.to_input(photo)
    fake = model.generator(x_sketch)
    score = model.discriminator(fake)
    adversarial = F.mse_loss(score, torch.ones_like(score))
    identity = F.l1_loss(model.generator(x_photo), x_photo)
    class_loss = sum(model.class_loss(model.extractor(x), labels) for x in (x_sketch, x_photo, fake)) / 3
    total = adversarial + 0.1 * identity + 10 * class_loss
    trained = [p for m in (model.generator, model.extractor, model.class_loss) for p in m.parameters()
               if p.requires_grad]
    g_e = torch.autograd.grad(total, trained)
    real_score, fake_score = model.discriminator(x_photo), model.discriminator(fake.detach())
    dis = (F.mse_loss(real_score, torch.ones_like(real_score)) + F.mse_loss(fake_score, torch.zeros_like(fake_score))) / 2
    g_d = torch.autograd.grad(dis, list(model.discriminator.parameters()))
    return trained, g_e, g_d


@pytest.mark.parametrize('warmup', [True, False])
def test_acnet_step_matches_spec_losses_and_touches_only_what_it_should(warmup):
    torch.manual_seed(1)
    model = ACNet(num_classes=3, backbone_type='resnet50', emb_dim=16, pretrained=False)
    model.set_warmup(warmup)
    model.train()
    reference = copy.deepcopy(model)
    sketch, photo, labels = rng_images(4, 32, seed=1), rng_images(4, 32, seed=2), torch.tensor([0, 1, 2, 0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    losses = acnet_step(training_nets(model), model.make_optimizers(lr=1e-5), [sketch, photo, labels])
    assert set(losses) == {'adv_loss', 'identity_loss', 'class_loss', 'dis_loss'}

    trained, g_e, g_d = _acnet_reference_grads(reference, sketch, photo, labels)
    names = {id(p): n for n, p in reference.named_parameters()}
    params = dict(model.named_parameters())
    for p, expected in zip(trained, g_e):
        assert torch.allclose(params[names[id(p)]].grad, expected, rtol=1e-3, atol=1e-6), names[id(p)]
    for (name, p), expected in zip(model.discriminator.named_parameters(), g_d):
        assert torch.allclose(p.grad, expected, rtol=1e-3, atol=1e-7), name  # the D loss only
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        frozen = warmup and name.startswith('extractor.backbone.')
        if frozen:
            assert not moved and p.grad is None, name
        elif p.grad is not None and p.grad.abs().sum() > 0:
            assert moved, name
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name  # BatchNorm statistics untouched


# ------------------------------------------------------------------------------------- MSEdge

def test_edge_map_of_a_line():
    image = torch.ones(1, 3, 32, 32)
    image[:, :, 15:17, :] = 0  # a black horizontal line on white
    edges = sobel_edges(image)
    assert edges.shape == image.shape
    assert edges.min() >= 0 and edges.max() <= 1
    assert edges[..., :10, :].min() > 0.99 and edges[..., 22:, :].min() > 0.99  # white away from the line
    assert edges[..., 14:18, :].max(dim=-2).values.max() < 0.01  # dark along the line's edges
    flat = sobel_edges(torch.full((1, 3, 8, 8), 0.3))
    assert torch.allclose(flat, torch.ones_like(flat))  # no edges: all white, no division by zero


@pytest.mark.parametrize('mode, expected', [('both', [True, True]), ('photo', [False, True]), ('none', [False, False])])
def test_edge_modes_choose_domains(mode, expected):
    domains = torch.tensor([SKETCH, PHOTO])
    assert edge_mask(domains, mode).tolist() == expected
    model = MSEdge(num_classes=2, emb_dim=8, edge_mode=mode, pretrained=False)
    images = rng_images(2, 32)
    x = model.to_input(images, domains)
    plain = (images.float() / 255 - model.mean) / model.std
    edges = (sobel_edges(images.float() / 255) - model.mean) / model.std
    for i, use_edges in enumerate(expected):
        assert torch.allclose(x[i], (edges if use_edges else plain)[i], atol=1e-6)


@pytest.mark.parametrize('backbone, size, maps', [('resnet50', 64, [(8, 8), (4, 4)]), ('vgg16', 64, [(16, 16), (8, 8)]),
                                                  ('resnet50', 32, [(4, 4), (2, 2)])])
def test_msedge_head_and_attention_shapes(backbone, size, maps):
    model = MSEdge(num_classes=3, backbone_type=backbone, emb_dim=12, pretrained=False).eval()
    expected_channels = {'resnet50': [512, 1024, 2048], 'vgg16': [256, 512, 512]}[backbone]
    assert model.backbone.feature_info.channels() == expected_channels
    with torch.no_grad():
        emb, (a3, a4) = model(rng_images(3, size), torch.tensor([SKETCH, PHOTO, PHOTO]))
    assert emb.shape == (3, 12) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert a3.shape == (3, 1, *maps[0]) and a4.shape == (3, 1, *maps[1])
    assert a3.min() >= 0 and a3.max() <= 1
    assert model.head.proj.in_features == sum(expected_channels)


def test_msedge_warmup_freezes_backbone_and_its_batchnorm(msedge):
    msedge.set_warmup(True)
    msedge.train()
    assert not any(p.requires_grad for p in msedge.backbone.parameters())
    assert all(p.requires_grad for p in msedge.head.parameters()) and msedge.head.training
    assert not any(m.training for m in msedge.backbone.modules())
    msedge.set_warmup(False)
    msedge.train()
    assert all(p.requires_grad for p in msedge.parameters()) and msedge.backbone.training


@pytest.mark.parametrize('warmup', [True, False])
def test_msedge_step_matches_proxy_anchor_gradient(warmup):
    torch.manual_seed(2)
    model = MSEdge(num_classes=3, emb_dim=16, pretrained=False)
    model.set_warmup(warmup)
    model.train()
    reference = copy.deepcopy(model)
    images, labels = rng_images(6, 32, seed=3), torch.tensor([0, 1, 2, 0, 1, 2])
    domains = torch.tensor([SKETCH, PHOTO] * 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    msedge_step(training_nets(model), model.make_optimizers(lr=1e-4), [images, labels, domains, torch.arange(6)])

    loss = reference.proxy_loss(reference(images, domains)[0], labels)
    trained = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    expected = torch.autograd.grad(loss, [p for _, p in trained])
    params = dict(model.named_parameters())
    for (name, _), grad in zip(trained, expected):
        assert torch.allclose(params[name].grad, grad, rtol=1e-3, atol=1e-7), name
    for name, p in model.named_parameters():
        if warmup and name.startswith('backbone.'):
            assert torch.equal(p, before[name]), name
    assert not torch.equal(params['proxy_loss.proxies'], before['proxy_loss.proxies'])
    moved_backbone = any(not torch.equal(params[n], before[n]) for n in params if n.startswith('backbone.'))
    assert moved_backbone != warmup


# ------------------------------------------------------------------------------------- weights

@pytest.mark.parametrize('name, out_indices', [('resnet50', (2, 3, 4)), ('vgg16', (2, 3, 4)), ('vgg16', (4,))])
def test_local_torchvision_and_timm_weights_load(tmp_path, name, out_indices):
    import timm
    import torchvision
    state = getattr(torchvision.models, name)().state_dict()
    torch.save(state, tmp_path / 'tv.pth')
    loaded = create_backbone(name, out_indices, weights=tmp_path / 'tv.pth')
    plain = create_backbone(name, out_indices, pretrained=False)
    assert list(loaded.state_dict()) == list(plain.state_dict())  # same layout as a checkpoint expects
    assert all(torch.equal(a, state[k.replace('features_', 'features.')])
               for k, a in loaded.state_dict().items() if k.replace('features_', 'features.') in state)
    last_conv = [v for k, v in loaded.state_dict().items() if k.endswith('weight') and v.ndim == 4][-1]
    assert any(torch.equal(last_conv, v) for v in state.values())
    # a timm-format file (wrapped, with DDP prefixes) works too
    timm_state = timm.create_model(name, pretrained=False).state_dict()
    torch.save({'state_dict': {f'module.{k}': v for k, v in timm_state.items()}}, tmp_path / 'timm.pth')
    loaded = create_backbone(name, out_indices, weights=tmp_path / 'timm.pth')
    first = next(iter(loaded.state_dict()))
    assert torch.equal(loaded.state_dict()[first], timm_state[first.replace('features_', 'features.')])


def test_bad_weights_and_offline_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(UserError, match='--weights file not found'):
        create_backbone('resnet50', (4,), weights=tmp_path / 'missing.pth')
    torch.save({'something': torch.zeros(2)}, tmp_path / 'wrong.pth')
    with pytest.raises(UserError, match="is not a resnet50 ImageNet checkpoint: it lacks 265 of the 318 backbone tensors"):
        create_backbone('resnet50', (2, 3, 4), weights=tmp_path / 'wrong.pth')
    import torchvision
    torch.save(torchvision.models.vgg16().state_dict(), tmp_path / 'vgg.pth')
    with pytest.raises(UserError, match="is not a resnet50 ImageNet checkpoint"):
        create_backbone('resnet50', (4,), weights=tmp_path / 'vgg.pth')
    (tmp_path / 'garbage.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match="garbage.pth' is not a vgg16"):
        create_backbone('vgg16', (4,), weights=tmp_path / 'garbage.pth')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'empty-cache'))
    with pytest.raises(UserError, match='--weights PATH.*--no_pretrained'):
        create_backbone('resnet50', (4,), pretrained=True)


def test_checkpoint_reload_gives_the_same_embeddings(acnet):
    checkpoint = {'method': 'acnet', 'args': {'backbone_type': 'resnet50', 'emb_dim': 16},
                  'train_classes': ['a', 'b', 'c'], 'model': acnet.state_dict()}
    reloaded = model_from_checkpoint(checkpoint)
    images, domains = rng_images(3, 32, seed=5), torch.tensor([SKETCH, PHOTO, SKETCH])
    with torch.no_grad():
        assert torch.allclose(acnet.eval().embed(images, domains), reloaded.embed(images, domains), atol=1e-6)
