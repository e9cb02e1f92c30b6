"""Networks of both methods: shapes, architecture, edge maps, warm-up, backbone weights, and one training
step per method (every ACNet loss variant) checked against gradients computed independently from the
loss formulas."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import ROOT, lr, make_model, rng_images
from methods import get_method
from methods.acnet import SEED_BACKBONES as ACNET_BACKBONES
from methods.msedge import SEED_BACKBONES as MSEDGE_BACKBONES, edge_mask
from model import Discriminator, Generator, sobel_edges
from utils import PHOTO, SKETCH
from zs_sbir.backbones import backbone_tag, create_timm
from zs_sbir.cli import UserError
from zs_sbir.retrieval import model_from_checkpoint
from zs_sbir.training import training_nets


@pytest.fixture(scope='module')
def acnet():
    torch.manual_seed(0)
    return make_model('acnet', num_classes=3, backbone_type='resnet50', emb_dim=16, pretrained=False)


@pytest.fixture(scope='module')
def msedge():
    torch.manual_seed(0)
    return make_model('msedge', num_classes=3, backbone_type='resnet50', emb_dim=16, pretrained=False)


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
    assert isinstance(g.out_conv[-1], nn.Tanh)
    d = Discriminator()
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == \
        [(3, 8, 4, 2, 1), (8, 16, 4, 2, 1), (16, 32, 4, 2, 1), (32, 64, 4, 1, 1), (64, 1, 4, 1, 1)]
    assert sum(isinstance(m, nn.InstanceNorm2d) for m in d.modules()) == 3
    assert d(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_generator_and_discriminator_carry_the_original_layer_names():
    """The released {prefix}_generator.pth files use these names (the original model.py's modules)."""
    blocks = [f'convs.{i}.conv.{j}.{t}' for i in range(8) for j in (0, 3) for t in ('weight', 'bias')]
    expected = ['in_conv.0.weight', 'in_conv.0.bias', 'down_sample.0.weight', 'down_sample.0.bias',
                'down_sample.3.weight', 'down_sample.3.bias', *blocks, 'up_sample.0.weight', 'up_sample.0.bias',
                'up_sample.3.weight', 'up_sample.3.bias', 'out_conv.0.weight', 'out_conv.0.bias']
    assert list(Generator().state_dict()) == expected
    assert list(Discriminator().state_dict()) == [f'conv{i}.0.{t}' for i in range(1, 5) for t in ('weight', 'bias')] \
        + ['conv5.weight', 'conv5.bias']


@pytest.mark.parametrize('backbone, size', [('resnet50', 32), ('vgg16', 32), ('resnet50', 64)])
def test_acnet_embeddings_shape_and_norm(backbone, size):
    torch.manual_seed(0)
    model = make_model('acnet', num_classes=4, backbone_type=backbone, emb_dim=24, pretrained=False).eval()
    images, domains = rng_images(4, size), torch.tensor([SKETCH, PHOTO, SKETCH, PHOTO])
    with torch.no_grad():
        emb = model.embed(images, domains)
        assert emb.shape == (4, 24)
        assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
        # sketches go through the generator first, photos do not
        x = model.to_input(images)
        assert torch.allclose(emb[1], model.extractor(x[1:2])[0], atol=1e-5)
        assert torch.allclose(emb[0], model.extractor(model.generator(x[0:1]))[0], atol=1e-5)


@pytest.mark.parametrize('backbone', ['resnet50', 'vgg16'])
def test_acnet_warmup_freezes_what_the_original_freezes(backbone):
    """The original: every parameter of extractor.backbone except the last two (the new classifier)."""
    model = make_model('acnet', num_classes=3, backbone_type=backbone, emb_dim=16, pretrained=False)
    model.set_warmup(True)
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert frozen == {id(p) for p in list(model.extractor.backbone.parameters())[:-2]}
    head = {'resnet50': 'fc', 'vgg16': 'head.fc'}[backbone]
    assert [n for n, p in model.extractor.backbone.named_parameters() if p.requires_grad] == \
        [f'{head}.weight', f'{head}.bias']
    model.set_warmup(False)
    assert all(p.requires_grad for p in model.parameters())


def test_acnet_extractor_is_the_original_timm_model():
    """Same tensor names and shapes as timm 0.4.12 gives the original's
    timm.create_model(name, num_classes=emb_dim, global_pool='max') (tests/fixtures, read off timm 0.4.12);
    VGG16 keeps fc6/fc7 and its new 4096 -> emb_dim head gets timm's N(0, 0.01) initialisation."""
    reference = json.loads((ROOT / 'tests' / 'fixtures' / 'timm0412_extractor_keys.json').read_text())
    for backbone in ('resnet50', 'vgg16'):
        torch.manual_seed(0)
        extractor = make_model('acnet', 3, backbone, 512, pretrained=False).extractor
        assert [[k, list(v.shape)] for k, v in extractor.backbone.state_dict().items()] == reference[backbone]
        assert extractor.backbone.global_pool.pool_type == 'max' if backbone == 'resnet50' else \
            extractor.backbone.head.global_pool.pool_type == 'max'
    vgg = extractor.backbone
    assert vgg.pre_logits.fc1.weight.shape == (4096, 512, 7, 7) and vgg.pre_logits.fc2.weight.shape == (4096, 4096, 1, 1)
    assert vgg.head.fc.weight.std().item() == pytest.approx(0.01, rel=0.02) and not vgg.head.fc.bias.any()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # max pool of fc7's map, the new linear layer, L2 norm
        fc7 = vgg.pre_logits(vgg.features(x))
        expected = F.normalize(vgg.head.fc(torch.amax(fc7, dim=(2, 3))), dim=-1)
        assert torch.allclose(extractor.eval()(x), expected, atol=1e-6)


def test_backbone_names_and_default_weights():
    """resnet50/vgg16 stand for each method's original ImageNet weights; any timm tag is accepted."""
    import timm
    assert backbone_tag(ACNET_BACKBONES, 'resnet50') == 'resnet50.ram_in1k'  # timm 0.4.12's resnet50 file
    assert timm.models.get_pretrained_cfg('resnet50.ram_in1k').url.endswith('/resnet50_ram-a26f946b.pth')
    assert backbone_tag(MSEDGE_BACKBONES, 'resnet50') == 'resnet50.tv_in1k'  # torchvision's, as the edge-fusion commits
    assert backbone_tag(ACNET_BACKBONES, 'vgg16') == backbone_tag(MSEDGE_BACKBONES, 'vgg16') == 'vgg16.tv_in1k'
    assert backbone_tag(ACNET_BACKBONES, 'resnet50.a1_in1k') == 'resnet50.a1_in1k'
    assert make_model('acnet', 2, 'resnet50.a1_in1k', 8, pretrained=False).backbone_tag == 'resnet50.a1_in1k'
    with pytest.raises(UserError, match=r"timm has no model 'resnt50' \(close matches: .*resnet50"):
        backbone_tag(ACNET_BACKBONES, 'resnt50')
    with pytest.raises(UserError, match=r"no pretrained tag 'b9_in1k' for resnet50 \(it has: resnet50.a1_in1k"):
        backbone_tag(MSEDGE_BACKBONES, 'resnet50.b9_in1k')


def test_acnet_backbone_batchnorm_stays_in_eval(acnet):
    acnet.train()
    norms = [m for m in acnet.extractor.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert acnet.generator.training and acnet.extractor.backbone.fc.training
    before = norms[0].running_mean.clone()
    acnet.extractor(torch.randn(2, 3, 32, 32))
    assert torch.equal(before, norms[0].running_mean)


def _acnet_reference_grads(model, sketch, photo, labels, weights=(1, 0.1, 10), class_on=('sketch', 'photo', 'fake')):
    """Losses and gradients computed literally from the formulas, one E call and one NormalizedSoftmax loss
    per part: the original train.py (defaults) and its ablation scripts (train_adv/ind/reg.py)."""
    x_sketch, x_photo = model.to_input(sketch), model.to_input(photo)
    fake = model.generator(x_sketch)
    score = model.discriminator(fake)
    losses = {'adv_loss': F.mse_loss(score, torch.ones_like(score))}
    if weights[1]:
        losses['identity_loss'] = F.l1_loss(model.generator(x_photo), x_photo)
    parts = {'sketch': x_sketch, 'photo': x_photo, 'fake': fake}
    losses['class_loss'] = sum(model.class_loss(model.extractor(parts[p]), labels) for p in class_on) / len(class_on)
    total = weights[0] * losses['adv_loss'] + weights[1] * losses.get('identity_loss', 0) + \
        weights[2] * losses['class_loss']
    trained = [p for m in (model.generator, model.extractor, model.class_loss) for p in m.parameters()
               if p.requires_grad]
    g_e = torch.autograd.grad(total, trained, allow_unused=True)
    real_score, fake_score = model.discriminator(x_photo), model.discriminator(fake.detach())
    losses['dis_loss'] = (F.mse_loss(real_score, torch.ones_like(real_score)) +
                          F.mse_loss(fake_score, torch.zeros_like(fake_score))) / 2
    g_d = torch.autograd.grad(losses['dis_loss'], list(model.discriminator.parameters()))
    return losses, trained, g_e, g_d


@pytest.mark.parametrize('warmup', [True, False])
def test_acnet_step_matches_spec_losses_and_touches_only_what_it_should(warmup):
    torch.manual_seed(1)
    model = make_model('acnet', num_classes=3, backbone_type='resnet50', emb_dim=16, pretrained=False)
    model.set_warmup(warmup)
    model.train()
    reference = copy.deepcopy(model)
    sketch, photo, labels = rng_images(4, 32, seed=1), rng_images(4, 32, seed=2), torch.tensor([0, 1, 2, 0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    losses = model.training_step(training_nets(model), model.make_optimizers(lr(1e-5)), [sketch, photo, labels])
    assert list(losses) == ['adv_loss', 'identity_loss', 'class_loss', 'dis_loss']

    expected_losses, trained, g_e, g_d = _acnet_reference_grads(reference, sketch, photo, labels)
    for name, value in expected_losses.items():
        assert losses[name].item() == pytest.approx(value.item(), rel=1e-5), name
    names = {id(p): n for n, p in reference.named_parameters()}
    params = dict(model.named_parameters())
    for p, expected in zip(trained, g_e):
        assert torch.allclose(params[names[id(p)]].grad, expected, rtol=1e-3, atol=1e-5), names[id(p)]  # biases before InstanceNorm: true gradient 0
    for (name, p), expected in zip(model.discriminator.named_parameters(), g_d):
        assert torch.allclose(p.grad, expected, rtol=1e-3, atol=1e-7), name  # the D loss only
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        frozen = warmup and name.startswith('extractor.backbone.') and not name.startswith('extractor.backbone.fc.')
        if frozen:
            assert not moved and p.grad is None, name
        elif p.grad is not None and p.grad.abs().sum() > 0:
            assert moved, name
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name  # BatchNorm statistics untouched


@pytest.mark.parametrize('weights, class_on', [
    ((1, 0, 1), ('photo', 'fake')),            # the original's train_adv.py: no identity term
    ((1, 1, 1), ('photo', 'fake')),            # train_ind.py: weights 1/1/1
    ((1, 0, 1), ('sketch', 'photo', 'fake')),  # train_reg.py
    ((2, 0.5, 3), ('sketch',)),
])
def test_acnet_loss_variants_match_a_hand_computation(weights, class_on):
    torch.manual_seed(3)
    model = make_model('acnet', num_classes=3, backbone_type='resnet50', emb_dim=16, pretrained=False,
                       loss_weights=weights, class_on=class_on).train()
    reference = copy.deepcopy(model)
    sketch, photo, labels = rng_images(4, 32, seed=4), rng_images(4, 32, seed=5), torch.tensor([2, 1, 0, 2])
    losses = model.training_step(training_nets(model), model.make_optimizers(lr(1e-5)), [sketch, photo, labels])
    expected, trained, g_e, _ = _acnet_reference_grads(reference, sketch, photo, labels, weights, class_on)
    assert list(losses) == list(expected)  # no identity_loss column when its weight is 0
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value.item(), rel=1e-5), name
    names = {id(p): n for n, p in reference.named_parameters()}
    params = dict(model.named_parameters())
    for p, grad in zip(trained, g_e):
        got = params[names[id(p)]].grad
        if grad is None:  # e.g. nothing reaches G through the class loss when it does not see fakes
            assert got is None or not got.any(), names[id(p)]
        else:
            assert torch.allclose(got, grad, rtol=1e-3, atol=1e-5), names[id(p)]  # biases before InstanceNorm: true gradient 0


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
    model = make_model('msedge', num_classes=2, emb_dim=8, edge_mode=mode, pretrained=False)
    images = rng_images(2, 32)
    x = model.to_input(images, domains)
    plain = (images.float() / 255 - model.mean) / model.std
    edges = (sobel_edges(images.float() / 255) - model.mean) / model.std
    for i, use_edges in enumerate(expected):
        assert torch.allclose(x[i], (edges if use_edges else plain)[i], atol=1e-6)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # --amp: the edge maps stay fp32, as in the original
        assert torch.equal(model.to_input(images, domains), x)


@pytest.mark.parametrize('backbone, size, maps', [('resnet50', 64, [(8, 8), (4, 4)]), ('vgg16', 64, [(16, 16), (8, 8)]),
                                                  ('resnet50', 32, [(4, 4), (2, 2)])])
def test_msedge_head_and_attention_shapes(backbone, size, maps):
    model = make_model('msedge', num_classes=3, backbone_type=backbone, emb_dim=12, pretrained=False).eval()
    expected_channels = {'resnet50': [512, 1024, 2048], 'vgg16': [256, 512, 512]}[backbone]
    assert model.backbone.feature_info.channels() == expected_channels
    with torch.no_grad():
        emb, (a3, a4) = model(rng_images(3, size), torch.tensor([SKETCH, PHOTO, PHOTO]))
    assert emb.shape == (3, 12) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert a3.shape == (3, 1, *maps[0]) and a4.shape == (3, 1, *maps[1])
    assert a3.min() >= 0 and a3.max() <= 1
    assert model.head.proj.in_features == sum(expected_channels)


def test_msedge_warmup_freezes_backbone_weights_but_batchnorm_statistics_move(msedge):
    """The original only sets requires_grad=False: BatchNorm stays in training mode during warm-up."""
    msedge.set_warmup(True)
    msedge.train()
    assert not any(p.requires_grad for p in msedge.backbone.parameters())
    assert all(p.requires_grad for p in msedge.head.parameters()) and msedge.head.training
    assert all(m.training for m in msedge.backbone.modules())
    norm = next(m for m in msedge.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    before, weight = norm.running_mean.clone(), norm.weight.clone()
    msedge(rng_images(2, 32), torch.tensor([SKETCH, PHOTO]))
    assert not torch.allclose(norm.running_mean, before) and torch.equal(norm.weight, weight)
    msedge.set_warmup(False)
    assert all(p.requires_grad for p in msedge.parameters())


def test_msedge_attention_blocks_follow_the_original():
    """1x1 projections of l and g to C_l channels without bias; SE as a bias-free C/16 bottleneck."""
    model = make_model('msedge', num_classes=2, backbone_type='resnet50', emb_dim=8, pretrained=False)
    for block, (c_l, c_g) in ((model.head.attend3, (512, 2048)), (model.head.attend4, (1024, 2048))):
        assert (block.project_local.in_channels, block.project_local.out_channels) == (c_l, c_l)
        assert (block.project_global.in_channels, block.project_global.out_channels) == (c_g, c_l)
        assert block.project_local.bias is None and block.project_global.bias is None
        assert block.score.out_channels == 1 and block.score.bias is not None
        linears = [m for m in block.se.gate if isinstance(m, nn.Linear)]
        assert [(m.in_features, m.out_features, m.bias) for m in linears] == [(c_l, c_l // 16, None),
                                                                              (c_l // 16, c_l, None)]
    block, x = model.head.attend3, torch.randn(2, 512, 4, 4)
    w1, w2 = [m.weight for m in block.se.gate if isinstance(m, nn.Linear)]
    squeezed = torch.sigmoid(w2 @ torch.relu(w1 @ x.mean(dim=(2, 3)).T)).T  # (2, 512)
    assert torch.allclose(block.se(x), x * squeezed[:, :, None, None], atol=1e-6)


def test_msedge_affine_augmentation_is_not_nearest():
    from torchvision.transforms import v2
    affine = [t for t in get_method('msedge').train_transform().transforms if isinstance(t, v2.RandomApply)][-1].transforms[0]
    assert isinstance(affine, v2.RandomAffine) and affine.interpolation == v2.InterpolationMode.BILINEAR


@pytest.mark.parametrize('warmup', [True, False])
def test_msedge_step_matches_proxy_anchor_gradient(warmup):
    torch.manual_seed(2)
    model = make_model('msedge', num_classes=3, emb_dim=16, pretrained=False)
    model.set_warmup(warmup)
    model.train()
    reference = copy.deepcopy(model)
    images, labels = rng_images(6, 32, seed=3), torch.tensor([0, 1, 2, 0, 1, 2])
    domains = torch.tensor([SKETCH, PHOTO] * 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.training_step(training_nets(model), model.make_optimizers(lr(1e-4)), [images, labels, domains, torch.arange(6)])

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

KINDS = {'features': dict(features_only=True, out_indices=(2, 3, 4)),  # MSEdge
         'extractor': dict(num_classes=16, global_pool='max')}         # ACNet


@pytest.mark.parametrize('name', ['resnet50', 'vgg16'])
@pytest.mark.parametrize('kind', list(KINDS))
def test_local_torchvision_and_timm_weights_load(tmp_path, name, kind):
    import timm
    import torchvision
    tag = backbone_tag(ACNET_BACKBONES, name)
    state = getattr(torchvision.models, name)().state_dict()
    torch.save(state, tmp_path / 'tv.pth')
    torch.manual_seed(0)
    loaded = create_timm(tag, weights=tmp_path / 'tv.pth', **KINDS[kind])
    torch.manual_seed(0)
    plain = create_timm(tag, pretrained=False, **KINDS[kind])
    assert list(loaded.state_dict()) == list(plain.state_dict())  # same layout as a checkpoint expects
    # torchvision's names, with VGG's fc6/fc7 (classifier.0/3) turned into timm's pre_logits convolutions
    tv_name = {'pre_logits.fc1': 'classifier.0', 'pre_logits.fc2': 'classifier.3'}
    head = 'fc.' if name == 'resnet50' else 'head.fc.'
    for key, value in loaded.state_dict().items():
        if key.startswith(head) or key.endswith('num_batches_tracked'):
            assert torch.equal(value, plain.state_dict()[key]), key  # a new head keeps timm's init
            continue
        source = key.replace('features_', 'features.')
        for timm_name, torchvision_name in tv_name.items():
            source = source.replace(timm_name, torchvision_name)
        assert torch.equal(value, state[source].reshape(value.shape)), key
    if kind == 'extractor' and name == 'vgg16':
        assert loaded.pre_logits.fc1.weight.shape == (4096, 512, 7, 7)
    # a timm-format file (wrapped, with DDP prefixes) works too
    timm_state = timm.create_model(name, pretrained=False).state_dict()
    torch.save({'state_dict': {f'module.{k}': v for k, v in timm_state.items()}}, tmp_path / 'timm.pth')
    loaded = create_timm(tag, weights=tmp_path / 'timm.pth', **KINDS[kind])
    for key, value in loaded.state_dict().items():
        if not key.startswith(head):
            assert torch.equal(value, timm_state[key.replace('features_', 'features.')]), key


def test_bad_weights_and_offline_errors_are_clear(tmp_path, monkeypatch):
    features = KINDS['features']
    with pytest.raises(UserError, match='--weights file not found'):
        create_timm('resnet50.tv_in1k', weights=tmp_path / 'missing.pth', **features)
    torch.save({'something': torch.zeros(2)}, tmp_path / 'wrong.pth')
    with pytest.raises(UserError, match="is not a resnet50.tv_in1k ImageNet checkpoint: it lacks 265 of the 265 "
                                        "backbone tensors"):
        create_timm('resnet50.tv_in1k', weights=tmp_path / 'wrong.pth', **features)
    import torchvision
    torch.save(torchvision.models.vgg16().state_dict(), tmp_path / 'vgg.pth')
    with pytest.raises(UserError, match="is not a resnet50.ram_in1k ImageNet checkpoint"):
        make_model('acnet', 2, 'resnet50', 8, weights=tmp_path / 'vgg.pth')
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / 'r18.pth')
    with pytest.raises(UserError, match=r"resnet50.tv_in1k ImageNet checkpoint: it lacks .*e\.g\. layer1.0.conv3"):
        make_model('msedge', 2, 'resnet50', 8, weights=tmp_path / 'r18.pth')
    (tmp_path / 'garbage.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match="garbage.pth' cannot be read as a --weights file: it is not a file written by torch.save"):
        create_timm('vgg16.tv_in1k', weights=tmp_path / 'garbage.pth', **features)
    (tmp_path / 'notes.txt').write_text('weights, honestly')
    with pytest.raises(UserError, match="notes.txt' cannot be read as a --weights file: it is not a file written by torch.save") as error:
        create_timm('vgg16.tv_in1k', weights=tmp_path / 'notes.txt', **features)
    assert 'weights_only' not in str(error.value)  # never advise loading a file unsafely
    torch.save([torch.zeros(2)], tmp_path / 'list.pth')
    with pytest.raises(UserError, match="list.pth' is not a vgg16.tv_in1k ImageNet checkpoint: it holds a list"):
        create_timm('vgg16.tv_in1k', weights=tmp_path / 'list.pth', **features)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'empty-cache'))
    for build, tag in ((lambda: make_model('acnet', 2, 'resnet50', 8), 'resnet50.ram_in1k'),
                       (lambda: make_model('msedge', 2, 'resnet50', 8), 'resnet50.tv_in1k'),
                       (lambda: make_model('acnet', 2, 'vgg16', 8), 'vgg16.tv_in1k'),
                       (lambda: make_model('msedge', 2, 'resnet50.a1_in1k', 8), 'resnet50.a1_in1k')):
        with pytest.raises(UserError, match=rf'pretrained {tag} weights \(timm/{tag}\).*--weights PATH.*--no_pretrained'):
            build()


def test_checkpoint_reload_gives_the_same_embeddings(acnet):
    checkpoint = {'method': 'acnet', 'args': {'backbone_type': 'resnet50', 'emb_dim': 16},
                  'train_classes': ['a', 'b', 'c'], 'model': acnet.state_dict()}
    reloaded = model_from_checkpoint(checkpoint)
    images, domains = rng_images(3, 32, seed=5), torch.tensor([SKETCH, PHOTO, SKETCH])
    with torch.no_grad():
        assert torch.allclose(acnet.eval().embed(images, domains), reloaded.embed(images, domains), atol=1e-6)
