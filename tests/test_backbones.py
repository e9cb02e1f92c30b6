"""Any timm backbone for both methods, with tiny random-init models (a ViT, a ConvNeXt, a ResNet18): a
training run, embeddings, save and reload; warm-up; MSEdge's three feature levels; input normalisation;
local weights; gradient checkpointing; unknown names."""
import copy

import pytest
import timm
import torch

from helpers import DEVICE, lr, make_model, rng_images
from methods import acnet as acnet_method, msedge as msedge_method
from train import train
from utils import PHOTO, SKETCH
from zs_sbir import backbones
from zs_sbir.backbones import backbone_tag, create_timm, input_normalisation
from zs_sbir.checkpoint import CHECKPOINT_FORMAT, VECTORS_FORMAT, load_torch
from zs_sbir.cli import UserError
from zs_sbir.config import parse_args
from zs_sbir.images import load_image
from zs_sbir.retrieval import model_from_checkpoint
from zs_sbir.safe_files import read_csv
from zs_sbir.training import training_nets

SEEDS = {'acnet': (acnet_method.SEED_BACKBONES, acnet_method.SEED_NORMALISATION),
         'msedge': (msedge_method.SEED_BACKBONES, msedge_method.SEED_NORMALISATION)}

TINY_BACKBONES = ['vit_tiny_patch16_224', 'convnext_atto', 'resnet18']
HEADS = {'vit_tiny_patch16_224': 'head', 'convnext_atto': 'head.fc', 'resnet18': 'fc'}
DOMAINS = torch.tensor([SKETCH, PHOTO, SKETCH, PHOTO])


@pytest.mark.parametrize('method', ['acnet', 'msedge'])
@pytest.mark.parametrize('backbone', TINY_BACKBONES)
def test_a_tiny_run_trains_saves_and_reloads(tiny_data, tmp_path, backbone, method):
    best = train(parse_args(['--method', method, '--backbone_type', backbone, '--data_root', str(tiny_data),
                             '--data_name', 'synthetic', '--no_pretrained', '--img_size', '32', '--batch_size', '8',
                             '--epochs', '2', '--warmup', '1', '--workers', '0', '--lr', '1e-3', '--emb_dim', '8',
                             '--device', DEVICE, '--save_root', str(tmp_path)]))
    prefix = tmp_path / f'synthetic_{method}_{backbone}_8'
    rows = read_csv(f'{prefix}_results.csv')
    assert len(rows) == 2 and all(0 <= float(r['precise']) <= 1 for r in rows)
    losses = [k for k in rows[0] if k.endswith('_loss')]
    assert all(float(r[k]) == float(r[k]) for r in rows for k in losses)  # finite, not NaN
    checkpoint = load_torch(f'{prefix}_model.pth', CHECKPOINT_FORMAT, 'checkpoint')
    assert checkpoint['backbone_tag'] == backbone_tag(SEEDS[method][0], backbone) and checkpoint['epoch'] == best['epoch']
    vectors = load_torch(f'{prefix}_vectors.pth', VECTORS_FORMAT, 'vectors')
    reloaded = model_from_checkpoint(checkpoint)
    picks = [0, len(vectors['paths']) - 1]
    images = torch.stack([load_image(tiny_data / 'synthetic' / 'val' / vectors['paths'][i], 32,
                                     'bilinear' if method == 'acnet' else 'bicubic') for i in picks])
    with torch.no_grad():
        again = reloaded.embed(images, vectors['domains'][picks])
    assert torch.allclose(again, vectors['vectors'][picks], atol=1e-5)


@pytest.mark.parametrize('backbone', TINY_BACKBONES)
def test_warmup_freezes_all_but_what_trains_from_scratch(backbone):
    torch.manual_seed(0)
    acnet = make_model('acnet', 3, backbone, 8, pretrained=False)
    acnet.set_warmup(True)
    trainable = [n for n, p in acnet.extractor.backbone.named_parameters() if p.requires_grad]
    assert trainable == [f'{HEADS[backbone]}.weight', f'{HEADS[backbone]}.bias']  # the new classifier only
    assert all(p.requires_grad for p in acnet.generator.parameters())
    msedge = make_model('msedge', 3, backbone, 8, pretrained=False)
    msedge.set_warmup(True)
    assert not any(p.requires_grad for p in msedge.backbone.parameters())
    assert all(p.requires_grad for m in (msedge.head, msedge.proxy_loss) for p in m.parameters())
    for model in (acnet, msedge):
        model.set_warmup(False)
        assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize('backbone, size, expected', [
    ('vit_tiny_patch16_224', 64, [(192, 4, 4)] * 3),                      # three late blocks, equal size
    ('convnext_atto', 64, [(80, 8, 8), (160, 4, 4), (320, 2, 2)]),
    ('resnet18', 64, [(128, 8, 8), (256, 4, 4), (512, 2, 2)]),
    ('resnet50', 64, [(512, 8, 8), (1024, 4, 4), (2048, 2, 2)]),           # the seeds keep their levels
    ('vgg16', 64, [(256, 16, 16), (512, 8, 8), (512, 4, 4)]),
])
def test_msedge_fuses_the_last_three_levels(backbone, size, expected):
    model = make_model('msedge', 3, backbone, 8, pretrained=False).eval()
    images = rng_images(4, size)
    with torch.no_grad():
        levels = model.backbone(model.to_input(images, DOMAINS))
        embeddings, (a3, a4) = model(images, DOMAINS)
    assert [tuple(f.shape[1:]) for f in levels] == expected
    assert a3.shape == (4, 1, *expected[0][1:]) and a4.shape == (4, 1, *expected[1][1:])
    assert embeddings.shape == (4, 8) and torch.allclose(embeddings.norm(dim=1), torch.ones(4), atol=1e-5)
    if backbone.startswith('vit'):  # the blocks are the last three of the ViT
        assert [info['module'] for info in model.backbone.feature_info.get_dicts()] == \
            ['blocks.9', 'blocks.10', 'blocks.11']


def test_each_backbone_gets_the_normalisation_its_weights_expect():
    clip = timm.models.get_pretrained_cfg('vit_base_patch16_clip_224.openai')
    assert input_normalisation('vit_base_patch16_clip_224.openai', SEEDS['acnet'][1]) == (tuple(clip.mean), tuple(clip.std))
    assert input_normalisation('convnext_tiny.fb_in1k', SEEDS['msedge'][1]) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert input_normalisation('resnet50.a1_in1k', SEEDS['acnet'][1]) == ((0.5,) * 3, (0.5,) * 3)  # a seed architecture
    assert input_normalisation('vgg16.tv_in1k', SEEDS['msedge'][1]) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    # ACNet's extractor brings its [-1, 1] inputs to the backbone's normalisation
    torch.manual_seed(0)
    acnet = make_model('acnet', 3, 'convnext_atto', 8, pretrained=False).eval()
    seen = []
    acnet.extractor.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images = rng_images(2, 32)
    with torch.no_grad():
        acnet.embed(images, torch.tensor([PHOTO, PHOTO]))
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(seen[0], (images.float() / 255 - mean) / std, atol=1e-5)
    seed = make_model('acnet', 3, 'resnet50', 8, pretrained=False).eval()
    seen.clear()
    seed.extractor.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        seed.embed(images, torch.tensor([PHOTO, PHOTO]))
    assert torch.equal(seen[0], images.float() / 127.5 - 1)  # the seed's [-1, 1], untouched
    msedge = make_model('msedge', 3, 'convnext_atto', 8, edge_mode='none', pretrained=False)
    assert torch.allclose(msedge.to_input(images, torch.tensor([PHOTO, PHOTO])), (images.float() / 255 - mean) / std)


@pytest.mark.parametrize('kwargs', [dict(features_only=True, out_indices=(-3, -2, -1)),
                                    dict(num_classes=8, global_pool='max')])
def test_local_weights_load_into_a_vit(tmp_path, kwargs):
    state = timm.create_model('vit_tiny_patch16_224', pretrained=False).state_dict()
    torch.save(state, tmp_path / 'vit.pth')
    model = create_timm('vit_tiny_patch16_224', weights=tmp_path / 'vit.pth', **kwargs)
    for key, value in model.state_dict().items():
        if not key.startswith('head.'):
            assert torch.equal(value, state[key.removeprefix('model.')]), key
    del state['blocks.3.attn.qkv.weight']
    torch.save(state, tmp_path / 'partial.pth')
    with pytest.raises(UserError, match=r"lacks 1 of the .* backbone tensors, e\.g\. blocks\.3\.attn\.qkv\.weight"):
        create_timm('vit_tiny_patch16_224', weights=tmp_path / 'partial.pth', **kwargs)


@pytest.mark.parametrize('backbone', ['vit_tiny_patch16_224', 'resnet18'])
@pytest.mark.parametrize('method', ['acnet', 'msedge'])
def test_gradient_checkpointing_gives_the_same_step(backbone, method):
    torch.manual_seed(4)
    plain = make_model(method, 3, backbone, 8, pretrained=False).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    sketch, photo, labels = rng_images(4, 32, seed=1), rng_images(4, 32, seed=2), torch.tensor([0, 1, 2, 0])
    batch = [sketch, photo, labels] if method == 'acnet' else [sketch, labels, DOMAINS, torch.arange(4)]
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(5)
        losses = model.training_step(training_nets(model), model.make_optimizers(lr(1e-3)), batch)
        results.append((losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (losses_a, grads_a), (losses_b, grads_b) = results
    assert all(torch.allclose(losses_a[k], losses_b[k], atol=1e-6) for k in losses_a)
    assert grads_a.keys() == grads_b.keys()
    assert all(torch.allclose(grads_a[n], grads_b[n], rtol=1e-4, atol=1e-6) for n in grads_a)


def test_a_model_without_max_pooling_keeps_its_own():
    """LeViT only averages: the extractor keeps timm's pooling and says so."""
    extractor = make_model('acnet', 3, 'levit_128s', 8, pretrained=False).extractor.eval()
    assert extractor.pool == 'avg'
    with torch.no_grad():
        out = extractor(torch.rand(2, 3, 224, 224) * 2 - 1)
    assert out.shape == (2, 8) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_unknown_names_fail_cleanly(monkeypatch, tmp_path):
    with pytest.raises(UserError, match=r"timm has no model 'vit_tiny_patch16' \(close matches: .*vit_tiny_patch16_"):
        backbone_tag(SEEDS['acnet'][0], 'vit_tiny_patch16')
    with pytest.raises(UserError, match=r"no pretrained tag 'nope' for convnext_atto \(it has: convnext_atto\."):
        backbone_tag(SEEDS['msedge'][0], 'convnext_atto.nope')
    monkeypatch.setattr(timm.models, 'get_pretrained_cfg', lambda tag: None)
    with pytest.raises(UserError, match='timm has no pretrained weights for resnet18'):
        backbones.check_pretrained_available('resnet18')


def test_a_vit_at_224_px_equals_its_fixed_size_self():
    """dynamic_img_size only changes what happens at other sizes: at 224 px the ViT is timm's own."""
    torch.manual_seed(0)
    ours = create_timm('vit_tiny_patch16_224', pretrained=False, num_classes=8, global_pool='max').eval()
    fixed = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=8, global_pool='max',
                              fc_norm=False).eval()
    fixed.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(x), fixed(x), atol=1e-5)
        # the pretrained final norm on every token, max over the patch tokens, the new head
        pooled = fixed.head(fixed.forward_features(x)[:, fixed.num_prefix_tokens:].amax(dim=1))
        assert torch.allclose(ours(x), pooled, atol=1e-5) and 'norm.weight' in ours.state_dict()


@pytest.mark.parametrize('method, backbone', [('msedge', 'resnet18'), ('acnet', 'vit_tiny_patch16_224')])
def test_bench_backbones_reports_speed_memory_and_sizes(method, backbone):
    import speed
    whole = timm.create_model(backbone, pretrained=False, num_classes=512, global_pool='max')
    features = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(-3, -2, -1))
    for checkpointing in (False, True):
        out = speed.measure_backbone(method, backbone, 32, 4, 1, checkpointing, DEVICE)
        assert out['images_per_s'] > 0 and out['memory_mb'] >= 0 and out['tag'] == backbone_tag(SEEDS[method][0], backbone)
        if method == 'msedge':
            assert out['features'] == features.feature_info.channels()
            assert out['params_m'] == pytest.approx(sum(p.numel() for p in features.parameters()) / 1e6)
        else:
            assert out['features'] == [whole.num_features]
            assert out['params_m'] == pytest.approx(sum(p.numel() for p in whole.parameters()) / 1e6, rel=1e-3)
