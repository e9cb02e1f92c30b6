"""The epoch loop around a method's training step, its data loader, and the processes of a distributed run
(torchrun): what train.py trains with, and what speed.py times. The steps themselves are the methods' own."""
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from zs_sbir.cli import DataError, UserError
from zs_sbir.datasets import EpochSampler
from zs_sbir.evaluation import loader_options, to_device

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


def make_train_loader(method, split, images, batch_size, seed, workers=0, device='cpu', rank=0, world=1):
    """The training batches of a method (its train_dataset: ACNet's sketch-photo pairs, single images by default),
    in an order and with draws that follow from the seed alone."""
    dataset, batch, drop_lone_last = method.train_dataset(split, images, batch_size)
    sampler = EpochSampler(len(dataset), seed, rank=rank, num_replicas=world)
    drop_last = drop_lone_last and len(sampler) % batch == 1 and len(sampler) > 1
    return DataLoader(dataset, batch, sampler=sampler, drop_last=drop_last, **loader_options(workers, device))


# ----------------------------------------------------------------------------------------------
# The trained parts of a model as a step calls them, and the epoch loop

@dataclass
class Nets:
    """What a method's training step calls: the model (`raw`), its trained parts (each wrapped in DDP when
    distributed) and the autocast of its forward passes."""
    raw: torch.nn.Module
    amp: bool = False
    parts: dict = field(default_factory=dict)
    device_type: str = 'cpu'

    def __getattr__(self, name):  # nets.generator, nets.extractor, ... : the (wrapped) trained parts
        try:
            return self.__dict__['parts'][name]
        except KeyError:
            raise AttributeError(name) from None

    def autocast(self):
        return torch.autocast(self.device_type, torch.bfloat16, enabled=self.amp)


def training_nets(model, amp=False, ddp=None):
    """The Nets of a model: its trained parts, wrapped in DDP where they have parameters that train."""
    wrap = ddp or (lambda m: m)
    # DDP wraps what has parameters that train (a triplet loss has none)
    parts = {name: wrap(part) if any(p.requires_grad for p in part.parameters()) else part
             for name, part in model.trained_parts().items()}
    return Nets(model, amp, parts, next(model.parameters()).device.type)


def compile_model(model):
    """torch.compile a model's networks (its compile_parts) in place: state_dict keys stay the same, so checkpoints
    do too.

    Inductor keeps bf16 roundings where eager makes them (a process-wide setting), so compiled bf16 steps
    give eager's numbers. Without it, a fused kernel compared an unrounded product with its stored bf16
    maximum: a tie-counting max backward (torch.amax) divided by 0 (pytorch/pytorch#195214).
    """
    import torch._inductor.config
    torch._inductor.config.emulate_precision_casts = True
    for part in model.compile_parts():
        part.compile()
    return model


class NonFiniteLoss(UserError):
    """A loss became NaN or infinite: training stops before anything of that epoch is saved."""


def train_epoch(nets, optimizers, loader, rt, desc, channels_last=False, log_every=10):
    """One pass over the loader; returns the mean of each loss (over steps and processes).

    The host syncs only every `log_every` steps, to refresh the progress bar and to stop on a
    non-finite loss (all processes agree, so they stop together).
    """
    nets.raw.train()
    sums, steps = {}, 0
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None if rt.main else True)
    for batch in bar:
        for name, value in nets.raw.training_step(nets, optimizers, to_device(batch, rt.device, channels_last)).items():
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

