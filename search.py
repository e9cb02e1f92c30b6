"""Sketch search over your own photos: index a folder with a trained checkpoint, query it with sketches,
or draw them in the browser.

    python search.py index --data_base result/synthetic_msedge_resnet50_512_model.pth --photos DIR --index OUT
    python search.py query --index OUT --query my_sketch.png [more files or folders] --num 5
    python search.py serve --index OUT                      # a sketchpad at http://127.0.0.1:7860
    python search.py merge --parts OUT_A OUT_B --index OUT  # shards indexed by several jobs, as one

`index` embeds every image under DIR (recursively; any format Pillow reads) with the checkpoint's photo
branch (ACNet: E(photo); MSEdge: as its --edge_mode treats photos) and writes OUT/: a FAISS index
(exact IndexFlatIP by default, --approx ivf or hnsw for millions of photos), the embeddings, the file of
each row and what identifies the model, all at once. Run again on the same folder, it embeds only new or
changed files and drops deleted ones. Files that do not decode are skipped and listed, never fatal.
`query` and `serve` embed sketches with the same model (refusing any other) and print or show the
top k photos; an exact index ranks them exactly as test.py does.
"""
import argparse
import csv
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from model import model_from_checkpoint
from utils import (CHECKPOINT_FORMAT, PHOTO, RESIZE, SKETCH, ArgumentParser, DataError, UserError, check_device,
                   check_replaceable, check_writable_dir, draw_retrieval, image_tensor, load_image, load_torch,
                   on_white, query_files, rank_gallery, read_rgb, run_cli, save_png)

INDEX_FORMAT = 'zs-sbir-index-1'
INDEX_KINDS = ('flat', 'ivf', 'hnsw')


# ----------------------------------------------------------------------------------------------- the model

def model_identity(checkpoint):
    """What a query model must share with the index's: the run, the epoch and a digest of the weights."""
    digest = hashlib.sha256()
    for key in sorted(checkpoint['model']):
        digest.update(key.encode())
        digest.update(checkpoint['model'][key].cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    args = checkpoint['args']
    return {'method': checkpoint['method'], 'run_id': checkpoint.get('run_id'), 'epoch': checkpoint['epoch'],
            'backbone_tag': checkpoint.get('backbone_tag'), 'emb_dim': args['emb_dim'], 'img_size': args['img_size'],
            'weights_sha256': digest.hexdigest()}


def load_model(data_base, device):
    checkpoint = load_torch(data_base, CHECKPOINT_FORMAT, 'checkpoint')
    try:
        model = model_from_checkpoint(checkpoint, device)
    except RuntimeError as error:
        raise UserError(f"'{data_base}' does not hold a {checkpoint['method']} model matching its own arguments: "
                        f"{str(error).splitlines()[0][:200]}") from error
    return model, model_identity(checkpoint)


@torch.inference_mode()
def embed(model, images, domain, device):
    """L2-normalised float32 embeddings of uint8 images (B, 3, H, W) taken as `domain`."""
    images = images.to(device)
    domains = torch.full((len(images),), domain, device=device)
    return torch.nn.functional.normalize(model.embed(images, domains).float(), dim=1).cpu()


# ----------------------------------------------------------------------------------------------- index

def photo_files(root):
    """Every file under `root` that Pillow recognises as an image, by its extension, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--photos folder not found: '{root}'")
    suffixes = {s.lower() for s in Image.registered_extensions()}
    files = sorted(str(p.relative_to(root)) for p in root.rglob('*')
                   if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith('.'))
    if not files:
        raise UserError(f"--photos folder '{root}' holds no image file")
    return files


def file_key(root, path):
    info = os.stat(Path(root) / path)
    return info.st_size, info.st_mtime_ns


class Photos(Dataset):
    """(row, uint8 image) for each file, or (row, None) for a file that does not decode."""

    def __init__(self, root, paths, size, interpolation):
        self.root, self.paths, self.size, self.interpolation = Path(root), paths, size, interpolation

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, row):
        try:
            return row, load_image(self.root / self.paths[row], self.size, self.interpolation)
        except DataError:
            return row, None


def collate(items):
    good = [(row, image) for row, image in items if image is not None]
    bad = [row for row, image in items if image is None]
    rows = torch.tensor([row for row, _ in good], dtype=torch.long)
    return rows, (torch.stack([image for _, image in good]) if good else None), bad


def read_index(folder):
    """An index folder's metadata, file table and embeddings; UserError when it is not one."""
    folder = Path(folder)
    meta_path = folder / 'meta.json'
    if not meta_path.is_file():
        raise UserError(f"'{folder}' is not an index of search.py (no meta.json): build it with `search.py index`")
    try:
        meta = json.loads(meta_path.read_text())
        with open(folder / 'files.csv', newline='') as f:
            table = list(csv.DictReader(f))
        vectors = np.load(folder / 'vectors.npy')
    except (OSError, ValueError) as error:
        raise UserError(f"index '{folder}' is incomplete or damaged ({error}): build it again") from error
    if meta.get('format') != INDEX_FORMAT or len(table) != len(vectors):
        raise UserError(f"index '{folder}' is not of this version or is damaged: build it again")
    return meta, table, vectors


def build_faiss(vectors, kind):
    """A FAISS inner-product index over unit vectors: exact, or IVF / HNSW for large collections."""
    import faiss
    dim = vectors.shape[1]
    if kind == 'flat' or len(vectors) < 1000:  # too few vectors to train an approximate index
        index = faiss.IndexFlatIP(dim)
    elif kind == 'ivf':
        # sqrt(N) lists, trained on 64 vectors a list: minutes, not hours, at 1M on a laptop
        lists = int(min(np.sqrt(len(vectors)), len(vectors) // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = vectors[np.random.default_rng(0).choice(len(vectors), min(len(vectors), 64 * lists), replace=False)]
        index.train(sample)
    else:
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    index.add(vectors)
    return index


def write_index(folder, meta, table, vectors, index):
    """Write the index folder at once: in full beside it, then swapped in (a crash leaves the old one)."""
    import faiss
    folder = Path(folder)
    partial, old = folder.with_name(f'.{folder.name}.partial'), folder.with_name(f'.{folder.name}.old')
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        faiss.write_index(index, str(partial / 'index.faiss'))
        np.save(partial / 'vectors.npy', vectors)
        with open(partial / 'files.csv', 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=['row', 'path', 'size', 'mtime_ns'])
            writer.writeheader()
            writer.writerows({'row': i, **row} for i, row in enumerate(table))
        (partial / 'meta.json').write_text(json.dumps(meta, indent=1))
    except (OSError, RuntimeError) as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"could not write the index '{folder}' ({error}): the old one, if any, is unchanged") from error
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    partial.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def build_index(args):
    """Embed the photos under --photos (only those new or changed since the last run) and write the index."""
    check_device(args.device)
    photos = Path(args.photos).resolve()
    files = photo_files(photos)
    out = Path(args.index)
    check_writable_dir(out.parent, '--index folder')
    previous = None
    if out.exists():
        if not (out / 'meta.json').is_file():
            raise UserError(f"'{out}' exists and is not an index of search.py: choose another --index (nothing was "
                            f"written)")
        previous = read_index(out)
    model, identity = load_model(args.data_base, args.device)
    reuse = {}
    if previous is not None and not args.rebuild:
        meta, table, vectors = previous
        if meta['model'] != identity:
            raise UserError(f"index '{out}' was built with another model ({meta['checkpoint']}): pass --rebuild to "
                            f"replace it, or choose another --index")
        if meta['photos'] == str(photos):
            reuse = {(row['path'], int(row['size']), int(row['mtime_ns'])): vectors[i] for i, row in enumerate(table)}
    keys = [(path, *file_key(photos, path)) for path in files]
    todo = [i for i, key in enumerate(keys) if key not in reuse]
    print(f'{len(files)} images under {photos}: {len(files) - len(todo)} unchanged, {len(todo)} to embed')
    embedded, failed, start = {}, [], time.perf_counter()
    if todo:
        dataset = Photos(photos, [files[i] for i in todo], identity['img_size'], RESIZE[identity['method']])
        loader = DataLoader(dataset, args.batch_size, num_workers=args.workers, collate_fn=collate,
                            pin_memory=args.device.startswith('cuda'))
        for rows, images, bad in tqdm(loader, desc='embed photos', disable=None):
            failed += [todo[row] for row in bad]
            if images is not None:
                for row, vector in zip(rows.tolist(), embed(model, images, PHOTO, args.device).numpy()):
                    embedded[todo[row]] = vector
    seconds = time.perf_counter() - start
    kept = [i for i, key in enumerate(keys) if key in reuse or i in embedded]
    if not kept:
        raise UserError(f"no image under '{photos}' could be read: nothing was written")
    vectors = np.stack([reuse[keys[i]] if keys[i] in reuse else embedded[i] for i in kept]).astype(np.float32)
    table = [{'path': keys[i][0], 'size': keys[i][1], 'mtime_ns': keys[i][2]} for i in kept]
    index = build_faiss(vectors, args.approx)
    meta = {'format': INDEX_FORMAT, 'checkpoint': str(Path(args.data_base).resolve()), 'model': identity,
            'photos': str(photos), 'kind': args.approx if type(index).__name__ != 'IndexFlatIP' else 'flat',
            'count': len(table), 'unreadable': [files[i] for i in failed]}
    write_index(out, meta, table, vectors, index)
    rate = f', {len(embedded) / seconds:.1f} images/s' if embedded else ''
    print(f'wrote {out}: {len(table)} photos ({meta["kind"]} index), {len(embedded)} embedded now{rate}, '
          f'{len(kept) - len(embedded)} reused')
    if failed:
        print(f'skipped {len(failed)} files that do not decode, e.g. {photos / files[failed[0]]} (listed in '
              f'{out / "meta.json"})')
    return meta


def merge_indexes(args):
    """One index from shards built with the same model, e.g. one `index` job per folder or machine. Paths
    become relative to the shards' common folder, so `index --photos` on that folder later updates it."""
    parts = [read_index(part) for part in args.parts]
    models = [meta['model'] for meta, _, _ in parts]
    if any(model != models[0] for model in models):
        other = next(part for part, model in zip(args.parts, models) if model != models[0])
        raise UserError(f"--parts '{args.parts[0]}' and '{other}' were built with different models: index every "
                        f"shard with the same checkpoint")
    out = Path(args.index)
    if out.exists() and not (out / 'meta.json').is_file():
        raise UserError(f"'{out}' exists and is not an index of search.py: choose another --index (nothing was "
                        f"written)")
    check_writable_dir(out.parent, '--index folder')
    root = Path(os.path.commonpath([meta['photos'] for meta, _, _ in parts]))
    table, rows, seen, unreadable = [], [], set(), []
    for meta, part_table, vectors in parts:
        shift = Path(meta['photos']).relative_to(root)
        unreadable += [str(shift / path) for path in meta['unreadable']]
        for row, entry in enumerate(part_table):
            path = str(shift / entry['path'])
            if path not in seen:  # a folder indexed by two shards counts once
                seen.add(path)
                table.append({'path': path, 'size': entry['size'], 'mtime_ns': entry['mtime_ns']})
                rows.append(vectors[row])
    vectors = np.stack(rows).astype(np.float32)
    index = build_faiss(vectors, args.approx)
    meta = {**parts[0][0], 'photos': str(root), 'count': len(table), 'unreadable': unreadable,
            'kind': args.approx if type(index).__name__ != 'IndexFlatIP' else 'flat',
            'merged_from': [str(Path(part).resolve()) for part in args.parts]}
    write_index(out, meta, table, vectors, index)
    print(f'wrote {out}: {len(table)} photos under {root} from {len(parts)} shards ({meta["kind"]} index)')
    return meta


# ----------------------------------------------------------------------------------------------- query

def top_rows(query, k, exact=None, index=None):
    """(rows, similarities) of the k best gallery rows for one query vector: exactly over the float32
    tensor `exact` (test.py's products and tie rule), or through the FAISS `index`."""
    if exact is not None:
        similarity = exact @ query
        order = rank_gallery(similarity.unsqueeze(0))[0, :k]
        return order.tolist(), similarity[order].tolist()
    scores, rows = index.search(query.numpy()[None], k)
    keep = rows[0] >= 0
    return rows[0][keep].tolist(), scores[0][keep].tolist()


def tune(index, nprobe=32, ef_search=128):
    """The search-time settings of an approximate index (more: slower, higher recall)."""
    if hasattr(index, 'nprobe'):
        index.nprobe = nprobe
    elif hasattr(index, 'hnsw'):
        index.hnsw.efSearch = ef_search
    return index


class Searcher:
    """An index with the model it was built with: top-k photos for a sketch image."""

    def __init__(self, index, data_base=None, device='cpu', nprobe=32, ef_search=128):
        import faiss
        self.folder = Path(index)
        self.meta, self.table, self.vectors = read_index(self.folder)
        data_base = data_base or self.meta['checkpoint']
        self.model, identity = load_model(data_base, device)
        if identity != self.meta['model']:
            raise UserError(f"'{data_base}' is not the model index '{self.folder}' was built with "
                            f"({self.meta['checkpoint']}): query it with that model, or build the index again")
        self.device, self.photos = device, Path(self.meta['photos'])
        self.classes = {Path(row['path']).parent.name for row in self.table}
        self.embed_sketch(Image.new('RGB', (8, 8), 'white'))  # warm up, so that timings are of steady state
        if self.meta['kind'] == 'flat':
            self.index, self.exact = None, torch.from_numpy(self.vectors)
        else:
            self.index, self.exact = tune(faiss.read_index(str(self.folder / 'index.faiss')), nprobe, ef_search), None

    def embed_sketch(self, image):
        """A query's embedding from a PIL image or an image file."""
        size, interpolation = self.meta['model']['img_size'], RESIZE[self.meta['model']['method']]
        tensor = (load_image(image, size, interpolation) if isinstance(image, (str, Path))
                  else image_tensor(on_white(image), size, interpolation))
        return embed(self.model, tensor[None], SKETCH, self.device)[0]

    def top_k(self, query, k):
        """(rows, similarities) of the k best photos, best first. The exact index ranks with the same
        float32 products and tie rule (lower row first) as test.py."""
        return top_rows(query, min(k, len(self.table)), self.exact, self.index)

    def results(self, query, k):
        """[(path, similarity, class)] for the top k: the class is the photo's folder name."""
        rows, sims = self.top_k(query, k)
        return [(self.photos / self.table[row]['path'], sim, Path(self.table[row]['path']).parent.name)
                for row, sim in zip(rows, sims)]


def run_query(args):
    check_device(args.device)
    if args.num < 1:
        raise UserError(f'--num must be at least 1, got {args.num}')
    searcher = Searcher(args.index, args.data_base, args.device, args.nprobe, args.ef_search)
    files = query_files(args.query, {s.lower() for s in Image.registered_extensions()})
    save_root = Path(args.save_root)
    check_writable_dir(save_root, '--save_root')
    pictures = [save_root / f'{path.stem}.png' for path in files]
    for picture in pictures:
        check_replaceable(picture)
    answers = []
    for path, picture in zip(files, pictures):
        start = time.perf_counter()
        query = searcher.embed_sketch(path)
        embedded = time.perf_counter()
        results = searcher.results(query, args.num)
        searched = time.perf_counter()
        query_class = path.parent.name if path.parent.name in searcher.classes else None
        tiles = []
        for photo, similarity, name in results:
            try:
                tiles.append((read_rgb(photo), f'{similarity:.3f}\n{name}', None if query_class is None
                              else name == query_class))
            except UserError as error:
                raise UserError(f'indexed photo unreadable (changed since indexing? run `search.py index` '
                                f'again): {error}') from error
        save_png(draw_retrieval(read_rgb(path), [], tiles), picture)
        print(f'{path} -> {picture} (embed {1000 * (embedded - start):.1f} ms, search '
              f'{1000 * (searched - embedded):.2f} ms over {len(searcher.table)} photos)')
        for rank, (photo, similarity, name) in enumerate(results, 1):
            print(f'  {rank:>3}  {similarity:.4f}  {name:<20} {photo}')
        answers.append(results)
    return answers


# ----------------------------------------------------------------------------------------------- serve

def sketch_image(value):
    """The picture in a Gradio sketchpad or upload value, on white: a PIL image, or None when empty."""
    if value is None:
        return None
    if isinstance(value, dict):  # ImageEditor: {'background', 'layers', 'composite'}
        value = value.get('composite')
        if value is None:
            return None
    image = on_white(value if isinstance(value, Image.Image) else Image.fromarray(np.asarray(value)))
    return None if np.asarray(image).min() == 255 else image  # an empty canvas


def make_app(searcher, k=8):
    """The Gradio page: a sketchpad and an upload box; every stroke or upload shows the top k photos."""
    import gradio as gr

    def search(value, count):
        image = sketch_image(value)
        if image is None:
            return []
        results = searcher.results(searcher.embed_sketch(image), int(count))
        return [(str(photo), f'{similarity:.3f} {name}') for photo, similarity, name in results]

    with gr.Blocks(title='Sketch search') as app:
        gr.Markdown(f'### Draw a sketch: the {len(searcher.table)} photos under `{searcher.photos}` are searched '
                    f'with `{Path(searcher.meta["checkpoint"]).name}`')
        # one column: beside another column the sketchpad's canvas is laid out wider than its box
        pad = gr.Sketchpad(label='sketch (pick the brush, then draw)', type='pil', canvas_size=(384, 384),
                           fixed_canvas=True, layers=False, transforms=(), height=460, elem_id='sketchpad',
                           brush=gr.Brush(default_size=4, colors=['#000000'], color_mode='fixed'))
        gallery = gr.Gallery(label='top photos', columns=8, height='auto', elem_id='results')
        with gr.Row():
            upload = gr.Image(label='or upload a sketch', type='pil', sources=['upload'], height=200)
            count = gr.Slider(1, 32, value=k, step=1, label='photos shown')
        pad.change(search, [pad, count], gallery, show_progress='hidden')
        upload.change(search, [upload, count], gallery)
        count.release(search, [pad, count], gallery)
    app.search = search
    return app


def serve(args):
    check_device(args.device)
    searcher = Searcher(args.index, args.data_base, args.device, args.nprobe, args.ef_search)
    app = make_app(searcher, args.num)
    print(f'serving {searcher.folder} ({len(searcher.table)} photos) on http://{args.host}:{args.port}')
    app.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(searcher.photos)],
               show_error=True)


# -----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest='command', required=True)
    index = commands.add_parser('index', help='embed a folder of photos into an index')
    index.add_argument('--data_base', required=True, help='a checkpoint written by train.py or convert.py')
    index.add_argument('--photos', required=True, help='folder of photos (searched recursively)')
    index.add_argument('--index', required=True, help='the index folder to write (or update)')
    index.add_argument('--approx', default='flat', choices=INDEX_KINDS,
                       help='flat: exact; ivf or hnsw: approximate, for collections in the millions')
    index.add_argument('--rebuild', action='store_true', help='embed everything again, replacing an index of '
                                                              'another model')
    index.add_argument('--batch_size', type=int, default=64)
    index.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1))
    merge = commands.add_parser('merge', help='one index from shards built with the same model')
    merge.add_argument('--parts', nargs='+', required=True, help='index folders written by `index`')
    merge.add_argument('--index', required=True, help='the merged index folder to write')
    merge.add_argument('--approx', default='flat', choices=INDEX_KINDS)
    query = commands.add_parser('query', help='the top photos of the index for each sketch')
    query.add_argument('--index', required=True)
    query.add_argument('--query', nargs='+', required=True, help='sketch image files or folders')
    query.add_argument('--num', type=int, default=5, help='photos per sketch')
    query.add_argument('--save_root', default='result/search', help='where the pictures go')
    web = commands.add_parser('serve', help='a web page with a sketchpad')
    web.add_argument('--index', required=True)
    web.add_argument('--num', type=int, default=8, help='photos shown at first')
    web.add_argument('--host', default='127.0.0.1', help='127.0.0.1: this machine only; 0.0.0.0: the network')
    web.add_argument('--port', type=int, default=7860)
    for sub in (query, web):
        sub.add_argument('--data_base', default=None, help='the checkpoint (default: the one the index was built '
                                                           'with); it must be the same model')
        sub.add_argument('--nprobe', type=int, default=32, help='ivf index: lists searched per query (more: '
                                                              'slower, higher recall)')
        sub.add_argument('--ef_search', type=int, default=128, help='hnsw index: candidates kept per query '
                                                                   '(more: slower, higher recall)')
    for sub in (index, query, web):
        sub.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    return p.parse_args(argv)


def run(args):
    empty = [f'--{k}' for k, v in vars(args).items() if v == '' or (isinstance(v, list) and '' in v)]
    if empty:
        raise UserError(f'{", ".join(empty)} must not be empty')
    if args.command in ('query', 'serve') and (args.nprobe < 1 or args.ef_search < 1):
        raise UserError(f'--nprobe and --ef_search must be at least 1, got {args.nprobe} and {args.ef_search}')
    if args.command == 'index' and (args.batch_size < 1 or args.workers < 0):
        raise UserError(f'--batch_size must be at least 1 and --workers at least 0, got {args.batch_size} and '
                        f'{args.workers}')
    return {'index': build_index, 'merge': merge_indexes, 'query': run_query, 'serve': serve}[args.command](args)


def main(argv=None):
    return run_cli(run, parse_args(argv))


if __name__ == '__main__':
    main()
