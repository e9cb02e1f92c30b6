"""One training step of each method, the epoch loop around it, its data loader, and the processes of a
distributed run (torchrun): what train.py trains with, and what speed.py times."""
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from cli import DataError, UserError
from config import CLASS_INPUTS, DEFAULT_LOSS_WEIGHTS
from evaluation import loader_options, to_device
from utils import EpochSampler, SketchPhotoPairs, SplitDataset, train_transform

# ----------------------------------------------------------------------------------------------
# Distributed runs (torchrun): one process per GPU, or gloo processes on the CPU


@dataclass
class Dist:
    """This process's place in a run: its rank among `world` processes, its device, and the DDP wrapper."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device('cpu')
    ddp: Optional[Callable] = None

    @property
    def main(self):
        return self.rank == 0


def init_distributed(device):
    """The Dist of this process: a single one, or (under torchrun, even with one process) one of WORLD_SIZE,
    its process group started (NCCL on GPUs, one GPU per process; gloo on the CPU)."""
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:  # not started by torchrun
        return Dist(device=torch.device(device))
    rank, local, world = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', 0)), int(os.environ['WORLD_SIZE'])
    cuda = str(device).startswith('cuda')
    if cuda:
        if local >= torch.cuda.device_count():
            raise UserError(f'torchrun started process {local} of this machine, which has {torch.cuda.device_count()} '
                            'GPU(s): pass --nproc_per_node at most that many')
        torch.cuda.set_device(local)
        device = f'cuda:{local}'
    dist.init_process_group('nccl' if cuda else 'gloo')
    return Dist(rank, world, torch.device(device),
                lambda m: DistributedDataParallel(m, device_ids=[local] if cuda else None))


def all_agree(flag, rt):
    """True when `flag` is true on every process (so that all of them stop, or none)."""
    if rt.world == 1:
        return flag
    value = torch.tensor([int(flag)], device=rt.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def reduce_mean(values, world):
    """Mean over processes of a stacked tensor (identity in a single process)."""
    if world > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= world
    return values


def wait_for_main(rt):
    """Every process waits here until the main one has got here (e.g. has written a file they read)."""
    if rt.world > 1:
        dist.barrier()


def configure_backends(args):
    """cuDNN autotuning, or deterministic kernels where torch has them (the rest warn). Both ways: several runs
    in one process (tests, notebooks) must not inherit an earlier run's setting."""
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.backends.cudnn.deterministic = args.deterministic
    if args.deterministic:  # cuBLAS reads it when its first handle is made, which is after this in a run
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(args.deterministic, warn_only=True)



def make_train_loader(method, split, images, batch_size, seed, workers=0, device='cpu', rank=0, world=1,
                      pairs=None):
    """ACNet: batch_size // 2 sketch-photo pairs per batch; MSEdge (and ACNet's extractor-only baselines,
    `pairs` False): batch_size single images, shuffled.

    Single images drop a last batch of one: BatchNorm cannot train on one (it is a different image every
    epoch, so none is left out for good).
    """
    pairs = method == 'acnet' if pairs is None else pairs
    if pairs:
        dataset, batch = SketchPhotoPairs(split, images, train_transform('acnet')), batch_size // 2
    else:
        dataset, batch = SplitDataset(split, images, train_transform(method)), batch_size
    sampler = EpochSampler(len(dataset), seed, rank=rank, num_replicas=world)
    drop_last = not pairs and len(sampler) % batch == 1 and len(sampler) > 1
    return DataLoader(dataset, batch, sampler=sampler, drop_last=drop_last, **loader_options(workers, device))


# ----------------------------------------------------------------------------------------------
# One training step per method. Each returns its losses as detached tensors (no host sync).

@dataclass
class Nets:
    """What a training step calls: the model (`raw`), its trained parts (each wrapped in DDP when
    distributed), the autocast of its forward passes and ACNet's loss settings."""
    raw: torch.nn.Module
    amp: bool = False
    loss_weights: tuple = DEFAULT_LOSS_WEIGHTS
    class_on: tuple = CLASS_INPUTS
    parts: dict = field(default_factory=dict)
    device_type: str = 'cpu'

    def __getattr__(self, name):  # nets.generator, nets.extractor, ... : the (wrapped) trained parts
        try:
            return self.__dict__['parts'][name]
        except KeyError:
            raise AttributeError(name) from None

    def autocast(self):
        return torch.autocast(self.device_type, torch.bfloat16, enabled=self.amp)


def training_nets(model, amp=False, ddp=None, loss_weights=DEFAULT_LOSS_WEIGHTS, class_on=CLASS_INPUTS):
    """The Nets of a model: ACNet's four trained parts, or MSEdge as one (`nets.model`)."""
    wrap = ddp or (lambda m: m)
    names = ('generator', 'discriminator', 'extractor', 'class_loss') if model.method == 'acnet' else ()
    # DDP wraps what has parameters (a triplet loss has none)
    parts = {name: getattr(model, name) for name in names if hasattr(model, name)} or {'model': model}
    parts = {name: wrap(part) if any(p.requires_grad for p in part.parameters()) else part
             for name, part in parts.items()}
    return Nets(model, amp, tuple(loss_weights), tuple(class_on), parts, next(model.parameters()).device.type)


def acnet_step(nets, optimizers, batch):
    sketch, photo, labels = batch
    n = len(sketch)
    sketch, photo = nets.raw.to_input(sketch), nets.raw.to_input(photo)
    adv_weight, identity_weight, class_weight = nets.loss_weights
    # Generator and extractor: adversarial + 0.1 * identity + 10 * class (the defaults of --loss_weights).
    discriminator = nets.raw.discriminator
    discriminator.requires_grad_(False)  # this loss trains G only; D gets its own step below
    with nets.autocast():
        # one call covers G(sketch) and, for the identity loss, G(photo): InstanceNorm is per image
        generated = nets.generator(torch.cat([sketch, photo]) if identity_weight else sketch)
        fake = generated[:n]
        fake_score = discriminator(fake).float()
        inputs = {'sketch': sketch, 'photo': photo, 'fake': fake}
        embeddings = nets.extractor(torch.cat([inputs[name] for name in nets.class_on]))
    discriminator.requires_grad_(True)
    losses = {'adv_loss': F.mse_loss(fake_score, torch.ones_like(fake_score))}
    if identity_weight:
        losses['identity_loss'] = F.l1_loss(generated[n:].float(), photo)
    # One call on equal parts = the mean of the per-part losses (mean reduction).
    losses['class_loss'] = nets.class_loss(embeddings.float(), labels.repeat(len(nets.class_on)))
    total = (adv_weight * losses['adv_loss'] + class_weight * losses['class_loss'] +
             (identity_weight * losses['identity_loss'] if identity_weight else 0))
    for name in ('generator', 'extractor'):
        optimizers[name].zero_grad(set_to_none=True)
    total.backward()
    for name in ('generator', 'extractor'):
        optimizers[name].step()
    # Discriminator: least squares, real photos -> 1, generated images -> 0.
    with nets.autocast():
        scores = nets.discriminator(torch.cat([photo, fake.detach().to(photo.dtype)])).float()
    real_score, fake_score = scores[:n], scores[n:]
    dis_loss = (F.mse_loss(real_score, torch.ones_like(real_score)) +
                F.mse_loss(fake_score, torch.zeros_like(fake_score))) / 2
    optimizers['discriminator'].zero_grad(set_to_none=True)
    dis_loss.backward()
    optimizers['discriminator'].step()
    losses['dis_loss'] = dis_loss
    return {name: value.detach() for name, value in losses.items()}


def msedge_step(nets, optimizers, batch):
    images, labels, domains, _ = batch
    with nets.autocast():
        embeddings, _ = nets.model(images, domains)
    loss = nets.raw.proxy_loss(embeddings.float(), labels)
    optimizers['model'].zero_grad(set_to_none=True)
    loss.backward()
    optimizers['model'].step()
    return {'proxy_loss': loss.detach()}


def extractor_step(nets, optimizers, batch):
    """ACNet's extractor-only baselines (ablation/norm.py, ablation/triplet.py): single sketches and photos
    through the extractor, one class loss (NormalizedSoftmax or triplet), no generator."""
    images, labels, _, _ = batch
    with nets.autocast():
        embeddings = nets.extractor(nets.raw.to_input(images))
    loss = nets.class_loss(embeddings.float(), labels)
    optimizers['extractor'].zero_grad(set_to_none=True)
    loss.backward()
    optimizers['extractor'].step()
    return {'class_loss': loss.detach()}


STEPS = {'acnet': acnet_step, 'msedge': msedge_step, 'extractor': extractor_step}


def step_of(model):
    """The training step of a model: its method's, or the extractor-only baselines'."""
    return STEPS['extractor' if getattr(model, 'extractor_only', False) else model.method]


class NonFiniteLoss(UserError):
    """A loss became NaN or infinite: training stops before anything of that epoch is saved."""


def train_epoch(nets, optimizers, loader, step, rt, desc, channels_last=False, log_every=10):
    """One pass over the loader; returns the mean of each loss (over steps and processes).

    The host syncs only every `log_every` steps, to refresh the progress bar and to stop on a
    non-finite loss (all processes agree, so they stop together).
    """
    nets.raw.train()
    sums, steps = {}, 0
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None if rt.main else True)
    for batch in bar:
        for name, value in step(nets, optimizers, to_device(batch, rt.device, channels_last)).items():
            sums[name] = sums.get(name, 0) + value
        steps += 1
        if steps % log_every == 0 or steps == len(loader):
            means = reduce_mean(torch.stack(list(sums.values())).float() / steps, rt.world).tolist()
            if not torch.isfinite(torch.tensor(means)).all():
                raise NonFiniteLoss(f'{desc}: a loss became NaN or infinite by step {steps} '
                                    f'({dict(zip(sums, means))}); lower --lr or check the data')
            bar.set_postfix({name: f'{value:.3f}' for name, value in zip(sums, means)})
    if not steps:
        raise DataError('the training loader produced no batch')
    return dict(zip(sums, means))

