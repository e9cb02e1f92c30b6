"""What training and evaluation read: an epoch sampler whose every draw follows from the seed, single images of a
split, ACNet's sketch-photo pairs and ClipPrompt's triplets. Items are uint8 image tensors (models normalise them
themselves)."""
import torch
from torch.utils.data import Dataset

from utils import PHOTO, SKETCH
from zs_sbir.seeding import item_rng

class EpochSampler(torch.utils.data.Sampler):
    """Yields (index, item_seed): the epoch's order and every item's random draws depend only on
    (seed, epoch, index), never on the number of workers or on where a run was resumed.

    With `num_replicas` > 1 each rank takes every num_replicas-th position of the (padded) order,
    as DistributedSampler does; `shuffle=False` keeps dataset order and adds no padding.
    """

    def __init__(self, size, seed, shuffle=True, rank=0, num_replicas=1):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.num_replicas, self.epoch = rank, num_replicas, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _epoch_seed(self):
        return self.seed * 100_003 + self.epoch

    def __iter__(self):
        epoch_seed = self._epoch_seed()
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(epoch_seed)).tolist()
            order += order[:len(self) * self.num_replicas - self.size]  # equal share per rank
        else:
            order = list(range(self.size))
        return ((i, epoch_seed) for i in order[self.rank::self.num_replicas])

    def __len__(self):
        if not self.shuffle:
            return len(range(self.rank, self.size, self.num_replicas))
        return -(-self.size // self.num_replicas)


class SplitDataset(Dataset):
    """Single images of a split: (uint8 image, label, domain, index). MSEdge training and evaluation."""

    def __init__(self, split, images, transform=None):
        self.split, self.images, self.transform = split, images, transform

    def __len__(self):
        return len(self.split)

    def __getitem__(self, key):
        with torch.random.fork_rng(devices=[]):
            index = item_rng(key)
            image = self.images[index]
            if self.transform is not None:
                image = self.transform(image)
        return image, self.split.labels[index], self.split.domains[index], index


class SketchPhotoPairs(Dataset):
    """ACNet training items: each sketch with a photo drawn at random from the same class.

    The draw and the augmentations are seeded from the EpochSampler's key, so pairs are reproducible.
    """

    def __init__(self, split, images, transform=None):
        self.split, self.images, self.transform = split, images, transform
        self.sketches = split.indices(SKETCH)
        self.photos_of_class = [[] for _ in split.classes]
        for i in split.indices(PHOTO):
            self.photos_of_class[split.labels[i]].append(i)

    def __len__(self):
        return len(self.sketches)

    def draw(self, key):
        """(sketch index, its label, a photo of its class) for a sampler key; call inside torch's fork_rng."""
        sketch_index = self.sketches[item_rng(key)]
        label = self.split.labels[sketch_index]
        return sketch_index, label, self.random_photo(label)

    def random_photo(self, label):
        photos = self.photos_of_class[label]
        return photos[torch.randint(len(photos), ()).item()]

    def __getitem__(self, key):
        with torch.random.fork_rng(devices=[]):
            sketch_index, label, photo_index = self.draw(key)
            sketch, photo = self.images[sketch_index], self.images[photo_index]
            if self.transform is not None:
                sketch, photo = self.transform(sketch), self.transform(photo)
        return sketch, photo, label


class SketchTriplets(SketchPhotoPairs):
    """ClipPrompt's training items: each sketch with a photo of its class and a photo of another class (a class drawn
    uniformly among the others, then one of its photos), (sketch, positive, negative, label). The draws are seeded
    from the EpochSampler's key, as the pairs' are."""

    def __getitem__(self, key):
        with torch.random.fork_rng(devices=[]):
            sketch_index, label, positive = self.draw(key)
            other = torch.randint(len(self.photos_of_class) - 1, ()).item()
            negative = self.random_photo(other + (other >= label))  # any class but the sketch's
            images = [self.images[i] for i in (sketch_index, positive, negative)]
            if self.transform is not None:
                images = [self.transform(image) for image in images]
        return (*images, label)
