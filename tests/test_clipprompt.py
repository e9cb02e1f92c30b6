"""ClipPrompt (methods/clipprompt.py) against its definition: the trainable set and its size for ViT-B/32, the
prompted forward against a transcription of ClipPrompt's (sequence-first attention written out by hand), one training
step against its losses written from the formulas, its triplets, its weights, its checkpoint converted, its options,
and a tiny run through every command (a 2-block open_clip model, tests/fixtures/open_clip). The side-by-side check
with ClipPrompt's own source is tests/clipprompt_side_by_side.py (docs/fidelity.md)."""
import copy
import math
import os
import re
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convert
import plot
import reproduce
import search
import test as retrieval
from helpers import DEVICE, ROOT, TINY_CLIP, build, check_cli, cli_checker, fake_run, free_port, make_model, rng_images, tiny
from methods import create_model, get_method
from train import main as train_main, train
from utils import PHOTO, SKETCH, Split, retrieval_metrics, scan_split
from zs_sbir.checkpoint import CHECKPOINT_FORMAT, VECTORS_FORMAT, load_torch
from zs_sbir.config import parse_args, run_prefix
from zs_sbir.datasets import EpochSampler, SketchTriplets
from zs_sbir.images import load_image
from zs_sbir.retrieval import model_from_checkpoint
from zs_sbir.safe_files import read_csv
from zs_sbir.training import compile_model, training_nets

CLASSES = ['cat', 'hot_air_balloon', 'tree']
RATES = Namespace(encoder_lr=1e-4, prompt_lr=1e-3)


def tiny_clip(**options):
    torch.manual_seed(0)
    return create_model('clipprompt', CLASSES, dict(backbone_type=TINY_CLIP, img_size=32, **options), pretrained=False)


# ----------------------------------------------------------------------------------------------- networks

def test_vit_b32_trains_clipprompts_parameters_only():
    """ClipPrompt's trainable set: every LayerNorm of each image tower and its projection (433,152 a tower for
    ViT-B/32), and 3 x 768 prompt parameters a tower: 870,912 in all; the text tower and logit_scale are frozen."""
    torch.manual_seed(0)
    model = make_model('clipprompt', 4, 'ViT-B-32', None, pretrained=False, img_size=32)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    for tower in ('sketch_tower', 'photo_tower'):
        names = [n for n in trainable if n.startswith(tower)]
        assert all(n.endswith('proj') or '.ln_' in n or n.split('.')[1].startswith('ln_') for n in names), names
        assert sum(trainable[n] for n in names) == 433_152 and f'{tower}.proj' in names
    assert trainable['sketch_prompt'] == trainable['photo_prompt'] == 3 * 768
    assert sum(trainable.values()) == 870_912 and model.sketch_tower is not model.photo_tower
    assert not any(p.requires_grad for p in model.text.parameters())
    groups = model.make_optimizers(RATES)['model'].param_groups
    assert [g['lr'] for g in groups] == [1e-4, 1e-4, 1e-3] and all(g['weight_decay'] == 0 for g in groups)


def attention_by_hand(block, x):
    """One residual attention block of OpenAI's CLIP, sequence-first (L, B, D), its attention written out."""
    attn, (length, batch, width) = block.attn, x.shape
    heads = attn.num_heads
    q, k, v = (block.ln_1(x) @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, dim=-1)
    split = lambda t: t.reshape(length, batch * heads, width // heads).transpose(0, 1)  # noqa: E731
    weights = torch.softmax(split(q) @ split(k).transpose(1, 2) / math.sqrt(width // heads), dim=-1)
    out = (weights @ split(v)).transpose(0, 1).reshape(length, batch, width)
    x = x + out @ attn.out_proj.weight.T + attn.out_proj.bias
    return x + block.mlp(block.ln_2(x))


def prompted_by_hand(visual, x, prompt, append=False):
    """ClipPrompt's PromptVisionTransformer.forward, transcribed: patches and class token with their positional
    embeddings, the prompts prepended, ln_pre, the blocks sequence-first, ln_post of token 0, the projection."""
    patches = visual.conv1(x).reshape(len(x), visual.conv1.out_channels, -1).permute(0, 2, 1)
    tokens = torch.cat([visual.class_embedding + torch.zeros(len(x), 1, patches.shape[-1]), patches], dim=1)
    tokens = tokens + visual.positional_embedding
    tokens = torch.cat([tokens, prompt] if append else [prompt, tokens], dim=1)
    h = visual.ln_pre(tokens).permute(1, 0, 2)
    for block in visual.transformer.resblocks:
        h = attention_by_hand(block, h)
    return visual.ln_post(h.permute(1, 0, 2)[:, 0]) @ visual.proj


@pytest.mark.parametrize('position', ['prepend', 'append'])
def test_the_prompted_towers_are_clipprompts_forward(position):
    model = tiny_clip(prompt_position=position).eval()
    images = rng_images(4, 32)
    x = model.to_input(images)
    with torch.no_grad():
        out = model(images, torch.tensor([SKETCH, PHOTO, SKETCH, PHOTO]))
        for i, (tower, prompt) in enumerate([(model.sketch_tower, model.sketch_prompt),
                                             (model.photo_tower, model.photo_prompt)] * 2):
            expected = prompted_by_hand(tower, x[i:i + 1], prompt[None], position == 'append')
            assert torch.allclose(out[i], expected[0], atol=1e-5)
        # the output is token 0: the first prompt (prepended), the class token (appended), not the plain CLIP output
        assert not torch.allclose(out[:1], model.sketch_tower(x[:1]), atol=1e-3)
        embedded = model.embed(images, torch.tensor([SKETCH, PHOTO, SKETCH, PHOTO]))
    assert torch.allclose(embedded, F.normalize(out, dim=-1)) and torch.allclose(embedded.norm(dim=1), torch.ones(4))
    x255 = images.float() / 255  # ImageNet's normalisation, as ClipPrompt's transform (not CLIP's)
    assert torch.allclose(x, (x255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) /
                          torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))


def test_one_tower_for_both_with_shared_tower():
    model = tiny_clip(shared_tower=True)
    assert model.photo_tower is model.sketch_tower and len(model.make_optimizers(RATES)['model'].param_groups) == 2
    assert not torch.equal(model.sketch_prompt, model.photo_prompt)


def test_one_training_step_is_clipprompts_loss_and_its_gradients():
    model = tiny_clip().train()
    reference = copy.deepcopy(model)
    sketch, positive, negative = rng_images(3, 32, 1), rng_images(3, 32, 2), rng_images(3, 32, 3)
    labels = torch.tensor([0, 2, 1])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = model.training_step(training_nets(model), model.make_optimizers(RATES), [sketch, positive, negative, labels])

    # the loss from the formulas: triplet on 1 - cosine (margin 0.3) + 0.5 x (CE of sketch + CE of positive), the
    # logits scaled by the stored logit_scale itself, the targets the text tower's 'a photo of a {class}' embeddings
    s = reference(sketch, torch.full((3,), SKETCH))
    p, q = reference(positive, torch.full((3,), PHOTO)), reference(negative, torch.full((3,), PHOTO))
    distance = lambda a, b: 1 - F.cosine_similarity(a, b)  # noqa: E731
    triplet = torch.clamp(distance(s, p) - distance(s, q) + 0.3, min=0).mean()
    import open_clip
    with torch.no_grad():
        text = F.normalize(reference.text.encode_text(open_clip.get_tokenizer(TINY_CLIP)(
            ['a photo of a cat', 'a photo of a hot air balloon', 'a photo of a tree'])), dim=-1)
    scale = reference.text.logit_scale
    ce_s = F.cross_entropy(scale * F.normalize(s, dim=-1) @ text.T, labels)
    ce_p = F.cross_entropy(scale * F.normalize(p, dim=-1) @ text.T, labels)
    assert losses['triplet_loss'].item() == pytest.approx(triplet.item(), rel=1e-5, abs=1e-6)
    assert losses['sketch_class_loss'].item() == pytest.approx(ce_s.item(), rel=1e-5)
    assert losses['photo_class_loss'].item() == pytest.approx(ce_p.item(), rel=1e-5)
    trained = [(n, t) for n, t in reference.named_parameters() if t.requires_grad]
    grads = torch.autograd.grad(triplet + 0.5 * (ce_s + ce_p), [t for _, t in trained])
    params = dict(model.named_parameters())
    for (name, _), grad in zip(trained, grads):
        assert torch.allclose(params[name].grad, grad, rtol=1e-4, atol=1e-7), name
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]) != parameter.requires_grad, name  # the frozen stay, the rest move


def test_triplets_pair_each_sketch_with_its_class_and_another(tiny_data):
    split = scan_split(tiny_data, 'synthetic', 'train')
    triplets = SketchTriplets(split, list(range(len(split))))  # the 'images' are their own indices
    sampler = EpochSampler(len(triplets), seed=3)
    negatives = []
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        for key in sampler:
            sketch, positive, negative, label = triplets[key]
            assert split.domains[sketch] == SKETCH and split.domains[positive] == split.domains[negative] == PHOTO
            assert split.labels[sketch] == split.labels[positive] == label != split.labels[negative]
            assert triplets[key] == (sketch, positive, negative, label)  # drawn from the key alone
            negatives.append(split.labels[negative])
    assert set(negatives) == set(range(len(split.classes)))  # every other class comes up


# ----------------------------------------------------------------------------------------------- weights

def test_weights_from_a_torchscript_archive_or_a_state_dict_and_offline(tmp_path, monkeypatch):
    import open_clip
    from zs_sbir.backbones import create_clip
    from zs_sbir.cli import UserError
    torch.manual_seed(1)
    source = open_clip.create_model(TINY_CLIP).eval()
    torch.save(source.state_dict(), tmp_path / 'state.pt')
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        traced = torch.jit.trace_module(source, {'encode_image': torch.randn(1, 3, 32, 32)}, check_trace=False)
    traced.save(str(tmp_path / 'archive.pt'))  # as OpenAI publishes its models
    for name in ('state.pt', 'archive.pt'):
        loaded = create_clip(TINY_CLIP, weights=tmp_path / name, img_size=64)  # positional embeddings resized
        state = loaded.state_dict()
        assert all(torch.equal(state[k], v) for k, v in source.state_dict().items() if k != 'visual.positional_embedding')
        assert state['visual.positional_embedding'].shape == (1 + 4 * 4, 64)
    with pytest.raises(UserError, match='--weights file not found'):
        create_clip(TINY_CLIP, weights=tmp_path / 'none.pt')
    torch.save({'visual.conv1.weight': torch.zeros(1)}, tmp_path / 'other.pt')
    with pytest.raises(UserError, match=f"other.pt' is not a {TINY_CLIP} CLIP checkpoint"):
        create_clip(TINY_CLIP, weights=tmp_path / 'other.pt')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'empty-cache'))
    with pytest.raises(UserError, match=r'pretrained ViT-B-32.openai weights .* HF_HUB_OFFLINE is set: pass --weights '
                                        r"PATH \(OpenAI's ViT-B-32.pt or an open_clip checkpoint\), or --no_pretrained"):
        create_clip('ViT-B-32')


# ----------------------------------------------------------------------------------------------- commands

def clipprompt_args(data, out, *extra):
    """tiny()'s options for the tiny CLIP, without --lr (clipprompt has --encoder_lr and --prompt_lr)."""
    argv = tiny(data, out, '--method', 'clipprompt', '--backbone_type', TINY_CLIP, '--emb_dim', '32', *extra)
    at = argv.index('--lr')
    return argv[:at] + argv[at + 2:]


def test_a_tiny_run_through_every_command(tiny_data, tmp_path, capsys):
    best = train(parse_args(clipprompt_args(tiny_data, tmp_path, '--epochs', '2')))
    prefix = tmp_path / f'synthetic_clipprompt_{TINY_CLIP}_32'
    rows = read_csv(f'{prefix}_results.csv')
    assert [r['metric_convention'] for r in rows] == ['torchmetrics'] * 2 and {r['val_classes'] for r in rows} == {'all'}
    assert list(rows[0])[1:4] == ['triplet_loss', 'sketch_class_loss', 'photo_class_loss']
    assert best['epoch'] == int(max(rows, key=lambda r: float(r['torchmetrics_precise']))['epoch'])
    out = capsys.readouterr().out
    assert 'unseen (torchmetrics) mAP@200' in out
    checkpoint = load_torch(f'{prefix}_model.pth', CHECKPOINT_FORMAT, 'checkpoint')
    vectors = load_torch(f'{prefix}_vectors.pth', VECTORS_FORMAT, 'vectors')
    val = scan_split(tiny_data, 'synthetic', 'val')
    model = model_from_checkpoint(checkpoint)
    with torch.no_grad():  # the saved rows are the reloaded model's embeddings of their files, stretched bilinearly
        again = model.embed(torch.stack([load_image(val.root / p, 32, 'bilinear') for p in vectors['paths']]),
                            vectors['domains'])
    assert torch.allclose(again, vectors['vectors'], atol=1e-5)
    v, labels, sketch = vectors['vectors'], vectors['labels'], vectors['domains'] == SKETCH
    expected = retrieval_metrics(v[sketch], labels[sketch], v[~sketch], labels[~sketch])
    metrics = retrieval.main(['--evaluate', '--data_base', f'{prefix}_model.pth', '--workers', '0', '--device', DEVICE])
    assert metrics['torchmetrics_precise'] == pytest.approx(expected['torchmetrics_precise'], abs=1e-6)
    assert '(torchmetrics) mAP@200' in capsys.readouterr().out
    retrieval.main(['--evaluate', '--data_base', f'{prefix}_model.pth', '--workers', '0', '--device', DEVICE,
                    '--metric_convention', 'sake'])
    assert f"precise {expected['precise']:.4f}" in capsys.readouterr().out
    query = val.root / val.paths[val.domains.index(SKETCH)]
    retrieval.main(['--query_name', str(query), '--data_base', f'{prefix}_model.pth', '--num', '3', '--save_root',
                    str(tmp_path / 'pictures'), '--device', DEVICE])
    assert (tmp_path / 'pictures' / f'{query.stem}.png').is_file()
    build(f'{prefix}_model.pth', val.root / 'photo', tmp_path / 'index')
    answers = search.main(['query', '--index', str(tmp_path / 'index'), '--query_name', str(query), '--num', '3',
                           '--save_root', str(tmp_path / 'search'), '--device', DEVICE])
    photos = (vectors['domains'] == PHOTO).nonzero()[:, 0]
    order = photos[torch.sort(v[photos] @ v[vectors['paths'].index(str(query.relative_to(val.root)))],
                              descending=True, stable=True).indices[:3]]
    assert [hit.path.name for hit in answers[0]] == [vectors['paths'][i].split('/')[-1] for i in order.tolist()]
    plot.main(['tsne', '--data_base', f'{prefix}_model.pth', '--save_root', str(tmp_path / 'figures')])
    train(parse_args(clipprompt_args(tiny_data, tmp_path, '--epochs', '3', '--resume')))
    assert len(read_csv(f'{prefix}_results.csv')) == 3


def test_training_free_clip_is_its_image_towers_class_token(tiny_data, capsys):
    torch.manual_seed(1)
    frozen = get_method('clipprompt').training_free(Namespace(backbone_type=TINY_CLIP, img_size=32), pretrained=False)
    images = rng_images(2, 32)
    cfg = frozen.visual.preprocess_cfg  # CLIP's own normalisation
    x = (images.float() / 255 - torch.tensor(cfg['mean']).view(1, 3, 1, 1)) / torch.tensor(cfg['std']).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(frozen.embed(images, torch.tensor([SKETCH, PHOTO])), F.normalize(frozen.visual(x), dim=-1))
    metrics = retrieval.main(['--evaluate', '--training_free', '--method', 'clipprompt', '--backbone_type', TINY_CLIP,
                              '--no_pretrained', '--data_root', str(tiny_data), '--data_name', 'synthetic',
                              '--img_size', '32', '--workers', '0', '--device', DEVICE])
    assert 0 < metrics['torchmetrics_precise'] <= 1
    assert re.search(rf'clipprompt {TINY_CLIP} \(random init\), no training on .*: \(torchmetrics\) mAP@200', capsys.readouterr().out)


def clipprompt_release(model):
    """A state dict laid out as ClipPrompt's Model saves it: the towers, the whole CLIP (whose visual is the sketch
    tower again) and the prompts."""
    state = {'sketch_prompt': model.sketch_prompt, 'photo_prompt': model.photo_prompt}
    for mine, theirs in (('sketch_tower.', 'sketch_encoder.'), ('photo_tower.', 'photo_encoder.'), ('text.', 'clip_model.')):
        state.update({theirs + k[len(mine):]: v for k, v in model.state_dict().items() if k.startswith(mine)})
    state.update({'clip_model.visual.' + k[len('sketch_tower.'):]: v for k, v in model.state_dict().items()
                  if k.startswith('sketch_tower.')})
    return {k: v.detach().clone() for k, v in state.items()}


check_convert = cli_checker(convert.main)


def test_a_clipprompt_checkpoint_converts_and_scores_what_clipprompt_scores(tiny_data, tmp_path, capsys):
    model = tiny_clip(prompt_num=2).eval()
    torch.save(clipprompt_release(model), tmp_path / 'synthetic_2_model.pth')
    convert.main(['--clipprompt', str(tmp_path / 'synthetic_2_model.pth'), '--backbone_type', TINY_CLIP, '--img_size',
                  '32', '--save', str(tmp_path / 'converted.pth'), '--data_root', str(tiny_data)])
    converted = model_from_checkpoint(load_torch(tmp_path / 'converted.pth', CHECKPOINT_FORMAT, 'checkpoint'))
    images, domains = rng_images(4, 32), torch.tensor([SKETCH, PHOTO, SKETCH, PHOTO])
    with torch.no_grad():
        assert torch.allclose(converted.embed(images, domains), model.embed(images, domains), atol=1e-6)
    metrics = retrieval.main(['--evaluate', '--data_base', str(tmp_path / 'converted.pth'), '--workers', '0',
                              '--device', DEVICE])
    val = scan_split(tiny_data, 'synthetic', 'val', val_classes='all')
    with torch.no_grad():
        v = model.embed(torch.stack([load_image(val.root / p, 32, 'bilinear') for p in val.paths]),
                        torch.tensor(val.domains))
    d, lab = torch.tensor(val.domains), torch.tensor(val.labels)
    expected = retrieval_metrics(v[d == SKETCH], lab[d == SKETCH], v[d == PHOTO], lab[d == PHOTO])
    assert metrics['torchmetrics_mAP@all'] == pytest.approx(expected['torchmetrics_mAP@all'], abs=1e-6)
    state = clipprompt_release(model)
    del state['photo_prompt']
    torch.save(state, tmp_path / 'broken.pth')
    check_convert(capsys, ['--clipprompt', tmp_path / 'broken.pth', '--backbone_type', TINY_CLIP, '--img_size', '32',
                           '--save', tmp_path / 'x.pth'], "is not a ClipPrompt checkpoint: it holds no sketch_prompt")
    check_convert(capsys, ['--clipprompt', tmp_path / 'synthetic_2_model.pth', '--img_size', '32', '--save',
                           tmp_path / 'x.pth'], r'is not a ClipPrompt checkpoint of ViT-B-32: .* pass the --backbone_type')
    check_convert(capsys, ['--clipprompt', tmp_path / 'synthetic_2_model.pth', '--backbone_type', TINY_CLIP, '--save',
                           tmp_path / 'x.pth'], 'was trained at 32 px: pass --img_size 32')
    assert not (tmp_path / 'x.pth').exists()


@pytest.mark.parametrize('extra, message', [
    (['--lr', '1e-3'], '--lr: clipprompt has two learning rates, --encoder_lr and --prompt_lr'),
    (['--emb_dim', '64'], f"--emb_dim must be 32, the size of {TINY_CLIP}'s embeddings, got 64"),
    (['--warmup', '1'], '--warmup: --method clipprompt freezes nothing while warming up'),
    (['--edge_mode', 'photo'], '--edge_mode applies to --method msedge only'),
    (['--prompt_num', '0'], '--prompt_num must be from 1 to 1000'),
    (['--backbone_type', 'ViT-B-33'], "open_clip has no model 'ViT-B-33' \\(close matches: ViT-B-32"),
    (['--backbone_type', 'RN50'], "prompts need open_clip's own ViT image tower"),
])
def test_options_that_do_not_apply_are_refused(tiny_data, tmp_path, capsys, extra, message):
    argv = clipprompt_args(tiny_data, tmp_path, *extra)
    while '--backbone_type' in extra and '--emb_dim' in argv:  # the tiny model's size would not fit another
        at = argv.index('--emb_dim')
        argv = argv[:at] + argv[at + 2:]
    check_cli(capsys, train_main, argv, message)
    assert not list(tmp_path.iterdir())


def test_defaults_are_clipprompts_and_variants_get_their_own_files():
    args = parse_args(['--method', 'clipprompt'])
    assert (args.backbone_type, args.emb_dim, args.batch_size, args.epochs, args.img_size) == ('ViT-B-32', 512, 64, 60, 224)
    assert (args.prompt_num, args.encoder_lr, args.prompt_lr, args.triplet_margin, args.cls_weight) == (3, 1e-4, 1e-3, 0.3, 0.5)
    assert (args.metric_convention, args.val_classes, args.lr, args.warmup) == ('torchmetrics', 'all', None, 0)
    assert run_prefix(args) == 'sketchy_clipprompt_ViT-B-32_512'
    names = {run_prefix(parse_args(['--method', 'clipprompt', *extra])) for extra in
             ([], ['--prompt_num', '5'], ['--prompt_position', 'append', '--shared_tower'], ['--metric_convention', 'sake'],
              ['--data_name', 'tuberlin'], ['--data_name', 'tuberlin', '--val_classes', 'seeds'])}
    assert names == {'sketchy_clipprompt_ViT-B-32_512', 'sketchy_clipprompt_ViT-B-32_512_p5',
                     'sketchy_clipprompt_ViT-B-32_512_append_shared', 'sketchy_clipprompt_ViT-B-32_512_sake',
                     'tuberlin_clipprompt_ViT-B-32_512', 'tuberlin_clipprompt_ViT-B-32_512_val-seeds'}


def test_the_published_row_is_in_clipprompts_convention_and_marks_all_val_classes(tmp_path):
    fake_run(tmp_path, 'tuberlin_clipprompt_ViT-B-32_512', [0.5])
    table = reproduce.build_table(reproduce.best_rows(tmp_path), all_metrics=True)
    assert '| clipprompt (published) | ViT-B-32 | 512 | test | torchmetrics | 75.3† | 66.0† | 73.9† | 69.7† |' in table
    assert '| clipprompt (ours) | ViT-B-32 | 512 | test | sake | 50.0 |' in table  # a CSV of the seeds' rule, SAKE's
    assert '† every TU-Berlin val class kept' in table


# ----------------------------------------------------------------------------------------------- speed paths

@torch.no_grad()
def test_channels_last_and_bf16_embed_like_the_plain_path():
    model, images, domains = tiny_clip().eval(), rng_images(4, 32), torch.tensor([SKETCH, PHOTO, SKETCH, PHOTO])
    plain = model.embed(images, domains)
    model.to(memory_format=torch.channels_last)
    assert torch.allclose(model.embed(images.contiguous(memory_format=torch.channels_last), domains), plain, atol=1e-5)
    with torch.autocast('cpu', torch.bfloat16):
        assert F.cosine_similarity(model.embed(images, domains).float(), plain).min() > 0.98


def test_compiled_bf16_steps_match_eager():
    batch = [rng_images(4, 32, 1), rng_images(4, 32, 2), rng_images(4, 32, 3), torch.tensor([0, 2, 1, 0])]
    runs = []
    for compiled in (False, True):
        model = tiny_clip().train()
        if compiled:
            compile_model(model)
        nets, optimizers = training_nets(model, amp=True), model.make_optimizers(RATES)
        runs.append([{k: v.item() for k, v in model.training_step(nets, optimizers, batch).items()} for _ in range(2)])
        assert all(torch.isfinite(p).all() for p in model.parameters()), f'compiled {compiled}: non-finite weights'
    for eager, fused in zip(*runs):
        assert fused == pytest.approx(eager, rel=0.05, abs=1e-3)


def test_amp_channels_last_gzs_run_and_two_gloo_processes_match_one(tiny_data, tmp_path):
    """--amp --channels_last --gzs train and score; torchrun with 2 CPU processes of 4 triplets each gives the
    metrics of 1 process of 8 (DDP over two towers whose frozen weights get no gradient)."""
    train(parse_args(clipprompt_args(tiny_data, tmp_path / 'fast', '--epochs', '1', '--amp', '--channels_last',
                                     '--gzs')))
    row = read_csv(tmp_path / 'fast' / f'synthetic_clipprompt_{TINY_CLIP}_32_gzs_results.csv')[-1]
    assert 0 < float(row['torchmetrics_precise']) <= 1 and 0 < float(row['gzs_torchmetrics_precise']) <= 1
    one = clipprompt_args(tiny_data, tmp_path / 'one', '--epochs', '1', '--device', 'cpu', '--batch_size', '8')
    train(parse_args(one))
    two = clipprompt_args(tiny_data, tmp_path / 'two', '--epochs', '1', '--device', 'cpu', '--batch_size', '4')
    launcher = tmp_path / 'train_tiny_clip.py'  # train.py in processes that know the tiny CLIP too
    launcher.write_text(f'import runpy, sys\nsys.path.insert(0, {str(ROOT / "tests")!r})\nimport helpers\n'
                        f'runpy.run_path({str(ROOT / "train.py")!r}, run_name="__main__")\n')
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
                             str(free_port()), str(launcher), *two], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=600)
    assert result.returncode == 0, result.stderr[:2000]
    a, b = (read_csv(tmp_path / run / f'synthetic_clipprompt_{TINY_CLIP}_32_results.csv')[-1] for run in ('one', 'two'))
    for name in ('triplet_loss', 'torchmetrics_mAP@all', 'torchmetrics_precise', 'precise'):
        assert float(a[name]) == pytest.approx(float(b[name]), abs=1e-4), name
