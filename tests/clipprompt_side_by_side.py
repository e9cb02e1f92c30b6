"""ClipPrompt's own source (leftthomas/ClipPrompt at e946e6d) run side by side with methods/clipprompt.py, offline,
with random CLIP weights of one seed (docs/fidelity.md): the same input tensor from an image file, the same
embeddings from both towers, one training step's loss terms, gradients and Adam update, the same metric numbers
(ClipPrompt's compute_metric under torchmetrics 1.0) and its checkpoint converted by convert.py. ClipPrompt's code
runs in a process of its own, with its checkout first on the path (its model.py and utils.py would shadow ours).

It needs a checkout of ClipPrompt and the packages its code imports, kept outside this repository:

    git clone https://github.com/leftthomas/ClipPrompt /tmp/ClipPrompt
    pip install --target /tmp/clipprompt-deps --no-deps clip-anytorch setuptools==80.10.2 torchmetrics==1.0.3 lightning-utilities==0.15.2
    python tests/clipprompt_side_by_side.py --source /tmp/ClipPrompt --deps /tmp/clipprompt-deps

It prints each comparison with its largest difference and exits 1 when one is beyond its tolerance.
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSES = ['airplane', 'alarm_clock', 'ant', 'ape', 'apple']
# ClipPrompt's side: build OpenAI's CLIP ViT-B/32 with seed 0, in fp16-representable weights as OpenAI's file, save it;
# load it through ClipPrompt's load_clip; Model(3) with seed 42; its transform, forward, training step and metric.
REFERENCE = r'''
import json, math, sys, types
from argparse import Namespace
import torch, torch.nn.functional as F
out, image_path = sys.argv[1], sys.argv[2]
import clip
from clip.model import CLIP, convert_weights
torch.manual_seed(0)
clip_model = CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12)
convert_weights(clip_model)
clip_model.float()
clip_model.logit_scale.data.fill_(math.log(100))
state = clip_model.state_dict()
torch.save(state, f'{out}/clip.pt')
import model as clipprompt_model, prompt
clipprompt_model.load_clip = lambda name: prompt.build_model(dict(state)).float()  # as load_clip does with a file
torch.manual_seed(42)
net = clipprompt_model.Model(3)
torch.save(net.state_dict(), f'{out}/clipprompt_model.pth')
import utils
from PIL import Image
transformed = utils.get_transform()(Image.open(image_path))
data = torch.load(f'{out}/inputs.pth')
x = lambda images: (images.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
    torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
with torch.no_grad():
    sketch_emb, photo_emb = net(x(data['images']), 'sketch'), net(x(data['images']), 'photo')
# one step of main.train, on the CPU: its globals set as its __main__ sets them
torch.Tensor.cuda = lambda self, *a, **k: self
import main
terms = {}
def recorded(name, function):
    def call(*a, **k):
        value = function(*a, **k)
        terms.setdefault(name, []).append(value.item())
        return value
    return call
main.triplet_criterion = recorded('triplet', torch.nn.TripletMarginWithDistanceLoss(
    distance_function=lambda a, b: 1.0 - F.cosine_similarity(a, b), margin=0.3))
main.cls_criterion = recorded('class', torch.nn.CrossEntropyLoss())
main.args, main.epoch = Namespace(epochs=1, cls_weight=0.5), 1
text = torch.cat([clip.tokenize('a photo of a {}'.format(name.replace('_', ' '))) for name in data['classes']])
with torch.no_grad():
    main.text_emb = F.normalize(net.clip_model.encode_text(text), dim=-1)
optimizer = torch.optim.Adam([{'params': net.sketch_encoder.parameters(), 'lr': 1e-4},
                              {'params': net.photo_encoder.parameters(), 'lr': 1e-4},
                              {'params': [net.sketch_prompt, net.photo_prompt], 'lr': 1e-3}])
before = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
batch = [x(data['sketch']), x(data['positive']), x(data['negative']), data['labels']]
total = main.train(net, [batch], optimizer)
step = {'terms': terms, 'total': total, 'before': before,
        'grads': {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None},
        'after': {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad},
        'trainable': {n: p.numel() for n, p in net.named_parameters() if p.requires_grad}}
metric = utils.compute_metric(data['vectors'], data['domains'], data['labels_v'])
torch.save({'transformed': transformed, 'sketch_emb': sketch_emb, 'photo_emb': photo_emb, 'step': step,
            'metric': metric}, f'{out}/reference.pth')
'''


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--source', required=True, help='a checkout of leftthomas/ClipPrompt')
    p.add_argument('--deps', required=True, help='a folder holding clip-anytorch and torchmetrics 1.0 (pip --target)')
    return p.parse_args(argv)


def drawing(path):
    image = Image.new('RGB', (300, 260), 'white')
    ImageDraw.Draw(image).line([(40, 30), (250, 220), (60, 200)], fill='black', width=5)
    image.save(path)
    return path


def compare(name, ours, theirs, tolerance, relative=False):
    ours, theirs = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    difference = (ours - theirs).abs().max().item()
    if relative:
        difference /= max(theirs.abs().max().item(), 1e-12)
    ok = difference <= tolerance
    print(f'| {name} | {difference:.2e} | {tolerance:g}{" (relative)" if relative else ""} | {"ok" if ok else "FAILS"} |')
    return ok


def main(argv=None):
    args = parse_args(argv)
    from methods import create_model
    from methods.clipprompt import ClipPrompt
    from utils import PHOTO, SKETCH, retrieval_metrics
    from zs_sbir.images import load_image
    from zs_sbir.training import training_nets
    out = Path(tempfile.mkdtemp(prefix='clipprompt-side-by-side-'))
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (12, 3, 224, 224), dtype=torch.uint8, generator=g)
    vectors = torch.randn(60, 16, generator=g)
    data = {'images': images[:4], 'sketch': images[4:6], 'positive': images[6:8], 'negative': images[8:10],
            'labels': torch.tensor([1, 3]), 'classes': CLASSES, 'vectors': vectors,
            'domains': torch.tensor([1] * 12 + [0] * 48), 'labels_v': torch.arange(60) % 4}
    torch.save(data, out / 'inputs.pth')
    image = drawing(out / 'drawing.png')
    subprocess.run([sys.executable, '-c', REFERENCE, str(out), str(image)], cwd=args.source, check=True,
                   env={'PYTHONPATH': f'{args.source}:{args.deps}', 'PATH': '/usr/bin:/bin'})
    reference = torch.load(out / 'reference.pth', weights_only=False)
    theirs_state = torch.load(out / 'clipprompt_model.pth')

    print('| comparison | largest difference | tolerance | |\n|---|---|---|---|')
    options = dict(backbone_type='ViT-B-32', img_size=224, prompt_num=3)
    model = create_model('clipprompt', CLASSES, options, weights=out / 'clip.pt')
    model.sketch_prompt.data.copy_(theirs_state['sketch_prompt'])
    model.photo_prompt.data.copy_(theirs_state['photo_prompt'])
    names = {n.replace('sketch_tower.', 'sketch_encoder.').replace('photo_tower.', 'photo_encoder.'): p.numel()
             for n, p in model.named_parameters() if p.requires_grad}
    ok = names == reference['step']['trainable']
    print(f'| trainable tensors: the same names and sizes, {sum(names.values()):,} parameters | | | '
          f'{"ok" if ok else "FAILS"} |')
    x = model.to_input(load_image(image, 224, ClipPrompt.interpolation)[None])[0]
    ok &= compare('input tensor of an image file', x, reference['transformed'], 1e-6)
    model.eval()
    with torch.no_grad():
        four = data['images']
        ok &= compare('sketch tower embeddings', model(four, torch.full((4,), SKETCH)), reference['sketch_emb'], 1e-5)
        ok &= compare('photo tower embeddings', model(four, torch.full((4,), PHOTO)), reference['photo_emb'], 1e-5)
    model.train()
    nets, optimizers = training_nets(model), model.make_optimizers(argparse.Namespace(encoder_lr=1e-4, prompt_lr=1e-3))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = model.training_step(nets, optimizers, [data['sketch'], data['positive'], data['negative'], data['labels']])
    step = reference['step']
    ok &= compare('triplet loss', losses['triplet_loss'], step['terms']['triplet'][0], 1e-5)
    ok &= compare('cross-entropy of the sketches', losses['sketch_class_loss'], step['terms']['class'][0], 1e-5)
    ok &= compare('cross-entropy of the positive photos', losses['photo_class_loss'], step['terms']['class'][1], 1e-5)
    total = losses['triplet_loss'] + 0.5 * (losses['sketch_class_loss'] + losses['photo_class_loss'])
    ok &= compare('total loss', total, step['total'], 1e-5)
    theirs_name = {n: n.replace('sketch_tower.', 'sketch_encoder.').replace('photo_tower.', 'photo_encoder.')
                   for n, _ in model.named_parameters()}
    grads = {theirs_name[n]: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ok &= set(grads) == set(step['grads'])
    ok &= compare('gradients (every trainable tensor)', max(
        ((grads[n] - step['grads'][n]).abs().max() / step['grads'][n].abs().max().clamp_min(1e-12)).item()
        for n in grads), 0, 1e-4)
    moved = []
    for n, p in model.named_parameters():
        if p.requires_grad:
            mask = step['grads'][theirs_name[n]].abs() > 1e-6
            moved.append((p.detach() - step['after'][theirs_name[n]])[mask].abs().max() if mask.any() else torch.tensor(0.))
    ok &= compare('parameters after the Adam step (where |grad| > 1e-6)', max(moved), 0, 1e-6)
    ok &= compare('weights before the step', max((before[n] - step['before'][theirs_name[n]]).abs().max()
                                                 for n in before), 0, 0)
    sketch, photo = data['domains'] == 1, data['domains'] == 0
    ours_metric = retrieval_metrics(vectors[sketch], data['labels_v'][sketch], vectors[photo], data['labels_v'][photo])
    for name in ('mAP@200', 'mAP@all', 'P@100', 'P@200', 'precise'):
        ok &= compare(f'{name}: torchmetrics convention vs ClipPrompt\'s compute_metric',
                      ours_metric[f'torchmetrics_{name}'], reference['metric'][name], 1e-6)
    print(f"| mAP@all: SAKE's convention, for contrast | {abs(ours_metric['mAP@all'] - reference['metric']['mAP@all']):.2e} "
          f"| (differs) | |")
    import convert
    checkpoint = convert.convert(convert.parse_args(['--clipprompt', str(out / 'clipprompt_model.pth'), '--save',
                                                     str(out / 'converted_model.pth')]))
    from zs_sbir.retrieval import model_from_checkpoint
    converted = model_from_checkpoint(checkpoint)
    with torch.no_grad():
        ok &= compare('converted checkpoint: sketch embeddings', converted(four, torch.full((4,), SKETCH)),
                      reference['sketch_emb'], 1e-5)
        ok &= compare('converted checkpoint: photo embeddings', converted(four, torch.full((4,), PHOTO)),
                      reference['photo_emb'], 1e-5)
    print('all equal within tolerance' if ok else 'DIFFERENCES beyond tolerance')
    shutil.rmtree(out)  # two CLIP checkpoints: gigabytes
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
