"""Sketch search over your own photos: index a folder with a trained checkpoint, query it with sketches,
or draw them in the browser.

    python search.py index --data_base result/synthetic_msedge_resnet50_512_model.pth --photos DIR --index OUT
    python search.py query --index OUT --query_name my_sketch.png [more files or folders] --num 5
    python search.py serve --index OUT                      # a sketchpad at http://127.0.0.1:7860
    python search.py merge --parts OUT_A OUT_B --index OUT  # shards indexed by several jobs, as one

`index` embeds every image under DIR (recursively, following links; any format Pillow reads; hidden files
and folders left out) with the checkpoint's photo branch (ACNet: E(photo); MSEdge: as its --edge_mode treats
photos) and writes its files into OUT/ (docs/search.md): the embeddings, the file of each row, what
identifies the model and, with --approx ivf or hnsw, a FAISS index for millions of photos. Run again on the
same folder, it embeds only new or changed files and drops deleted ones; an interrupted run keeps what it
embedded, and the next run goes on from there. Files that do not decode and folders that cannot be read
are skipped and listed, never fatal. `query` and `serve` embed sketches with the same model (refusing any
other) and print or show the top k photos; an exact index ranks them exactly as test.py does. `serve`
hands out the result pictures and nothing else.
"""
import argparse
import atexit
from contextlib import contextmanager
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from zs_sbir.cli import (DEFAULT_WORKERS, ArgumentParser, Limit, UserError, check_device, check_numbers, default_device,
                         first_line, run_cli)
from zs_sbir.images import pillow_suffixes, query_files, read_rgb, to_rgb8
from zs_sbir.pictures import draw_retrieval, save_png
from zs_sbir.safe_files import plan_outputs, writing_into
from zs_sbir.checkpoint import model_identity
from zs_sbir.onnx_runtime import RUNTIMES, choose_runtime
from zs_sbir.precision import PRECISION_HELP, PRECISIONS
from zs_sbir.retrieval import load_model
from zs_sbir.search_index import (INDEX_FORMAT, INDEX_KINDS, JOURNAL, LOCK, Searcher, build_faiss, embed_as, file_key,
                                  is_index, photo_batches, photo_files, photo_folders, read_index, write_index)
from utils import PHOTO


# ----------------------------------------------------------------------------------------------- index

@contextmanager
def claimed(out):
    """Hold the index folder `out` (created if need be) for this process, from the check that it is an index (or
    empty) to the last write: a second writer is refused."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--index '{out}' is a file, not a folder")
    with writing_into(out, '--index', LOCK):
        if not is_index(out) and any(p.name not in (LOCK, JOURNAL) for p in out.iterdir()):
            raise UserError(f"'{out}' exists and is not an index of search.py: choose another --index (nothing was "
                            f"written)")
        yield out


def index_kind(args, previous):
    """The kind of index to write: --approx, else the kind of the index being updated (else exact)."""
    before = previous[0].get('approx', previous[0]['kind']) if previous else None
    kind = args.approx or before or 'flat'
    if before and kind != before:
        print(f'index kind: {before} -> {kind} (as --approx asks)')
    return kind


def previous_index(out, rebuild):
    """The index already in `out`, if any; with --rebuild a damaged one is replaced (it is not read)."""
    if not is_index(out):
        return None
    try:
        return read_index(out)
    except UserError:
        if not rebuild:
            raise
        print(f"note: the index in '{out}' is damaged: --rebuild replaces it")
        return None


def check_replaceable_index(previous, out, identity, photos, rebuild):
    """An existing index is updated only with the same model and photos folder; anything else needs --rebuild."""
    if previous is None or rebuild:
        return
    meta = previous[0]
    if meta['model'] != identity:
        raise UserError(f"index '{out}' was built with another model ({meta['checkpoint']}): pass --rebuild to "
                        f"replace it, or choose another --index (nothing was written)")
    if meta['photos'] != str(photos):
        raise UserError(f"index '{out}' holds the photos of '{meta['photos']}', not of '{photos}': pass --rebuild to "
                        f"replace it (every photo is embedded again), or choose another --index (nothing was written)")


def commit(out, meta, rows, vectors, kind, complete):
    """Write the index: exact or approximate (`kind`) when complete, else exact (an interrupted build)."""
    index = build_faiss(vectors, kind) if complete else None
    meta = {**meta, 'approx': kind, 'kind': kind if index is not None else 'flat', 'count': len(rows),
            'complete': complete}
    write_index(out, meta, rows, vectors, index)
    return meta


def build_index(args):
    """Embed the photos under --photos (only those new or changed since the last run) and write the index."""
    check_device(args.device)
    photos = Path(args.photos).resolve()
    out = Path(args.index)
    files, skipped = photo_files(photos)
    model, checkpoint = load_model(args.data_base, args.device, args.runtime, precision=args.precision)
    if args.precision == 'int8':
        model.prepare([PHOTO])  # quantized (or found) now: a missing training split is told before any work
    identity = model_identity(checkpoint)
    with claimed(out):
        previous = previous_index(out, args.rebuild)
        check_replaceable_index(previous, out, identity, photos, args.rebuild)
        kind = index_kind(args, previous)
        reuse = {}
        if previous is not None and not args.rebuild:
            _, table, vectors = previous
            reuse = {(row['path'], int(row['size']), int(row['mtime_ns'])): vectors[i] for i, row in enumerate(table)}
        keys = [file_key(photos, path) for path in files]
        todo = [i for i, key in enumerate(keys) if key not in reuse]
        print(f'{len(files)} images under {photos}: {len(files) - len(todo)} unchanged, {len(todo)} to embed')
        meta = {'format': INDEX_FORMAT, 'checkpoint': str(Path(args.data_base).resolve()), 'model': identity,
                'photos': str(photos), 'photo_folders': [str(photos)],
                'skipped': [f"'{path}' {why}" for path, why in skipped]}
        embedded, failed = {}, []

        def save(complete):
            kept = [i for i, key in enumerate(keys) if key in reuse or i in embedded]
            if not kept:
                return None
            vectors = np.stack([reuse[keys[i]] if keys[i] in reuse else embedded[i] for i in kept]).astype(np.float32)
            rows = [dict(zip(('path', 'size', 'mtime_ns'), keys[i])) for i in kept]
            return commit(out, {**meta, 'unreadable': [files[i] for i in failed]}, rows, vectors, kind, complete)

        start, saved = time.perf_counter(), time.monotonic()
        try:
            for positions, images, bad in photo_batches([files[i] for i in todo], photos, identity['img_size'],
                                                        model.interpolation, args.batch_size, args.workers,
                                                        args.device):
                failed += [todo[i] for i in bad]
                if images is not None:
                    for i, vector in zip(positions, embed_as(model, images, PHOTO, args.device).numpy()):
                        embedded[todo[i]] = vector
                if time.monotonic() - saved > args.save_every:
                    save(complete=False)
                    saved = time.monotonic()
        except BaseException:
            if embedded:  # interrupted or failed: keep what was embedded, for the next run to go on from
                save(complete=False)
                print(f'kept the {len(embedded)} photos embedded so far in {out}: run the same command again to go on')
            raise
        seconds = time.perf_counter() - start
        meta = save(complete=True)
    if meta is None:
        raise UserError(f"no image under '{photos}' could be read: nothing was written")
    rate = f', {len(embedded) / seconds:.1f} images/s' if embedded else ''
    exact = ' (fewer than 1000 photos: searched exactly)' if meta['kind'] != kind else ''
    print(f'wrote {out}: {meta["count"]} photos ({meta["kind"]} index{exact}), {len(embedded)} embedded now{rate}, '
          f'{meta["count"] - len(embedded)} reused')
    if failed:
        print(f'skipped {len(failed)} files that do not decode, e.g. {photos / files[failed[0]]} (listed in '
              f'{out / "meta.json"})')
    for path, why in skipped[:5]:
        print(f"skipped '{path}': it {why}")
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
    root = Path(os.path.commonpath([meta['photos'] for meta, _, _ in parts]))
    table, rows, seen, unreadable, skipped = [], [], set(), [], []
    for meta, part_table, vectors in parts:
        shift = Path(meta['photos']).relative_to(root)
        unreadable += [str(shift / path) for path in meta.get('unreadable', [])]
        skipped += meta.get('skipped', [])
        for row, entry in enumerate(part_table):
            path = str(shift / entry['path'])
            if path not in seen:  # a folder indexed by two shards counts once
                seen.add(path)
                table.append({'path': path, 'size': entry['size'], 'mtime_ns': entry['mtime_ns']})
                rows.append(vectors[row])
    folders = list(dict.fromkeys(str(f) for meta, _, _ in parts for f in photo_folders(meta)))
    with claimed(out):
        previous = previous_index(out, args.rebuild)
        check_replaceable_index(previous, out, models[0], root, args.rebuild)
        kind = index_kind(args, previous)
        meta = {key: parts[0][0][key] for key in ('format', 'checkpoint', 'model')}
        meta = commit(out, {**meta, 'format': INDEX_FORMAT, 'photos': str(root), 'photo_folders': folders,
                            'unreadable': unreadable,
                            'skipped': skipped, 'merged_from': [str(Path(part).resolve()) for part in args.parts]},
                      table, np.stack(rows).astype(np.float32), kind, complete=all(
                          meta.get('complete', True) for meta, _, _ in parts))
    exact = ' (fewer than 1000 photos: searched exactly)' if meta['kind'] != kind else ''
    print(f'wrote {out}: {len(table)} photos under {root} from {len(parts)} shards ({meta["kind"]} index{exact})')
    return meta


# ----------------------------------------------------------------------------------------------- query

def run_query(args):
    check_device(args.device)
    searcher = Searcher(args.index, args.data_base, args.device, args.nprobe, args.ef_search, args.runtime,
                        args.precision)
    note_incomplete(searcher)
    files = query_files(args.query_name, pillow_suffixes())
    with writing_into(args.save_root):
        plan = plan_outputs(files, args.save_root, [('a photos folder of the index', f) for f in searcher.photo_folders],
                            lambda root, stem: [root / f'{stem}.png'])
        return [answer(searcher, path, picture, args.num) for path, (picture,) in plan]


def answer(searcher, path, picture, num):
    """The top `num` photos for the sketch at `path`, printed and drawn into `picture`."""
    start = time.perf_counter()
    query = searcher.embed_sketch(path)
    embedded = time.perf_counter()
    results = searcher.gallery.top_k(query, num)
    searched = time.perf_counter()
    query_class = path.parent.name if path.parent.name in searcher.classes else None
    tiles = []
    for _, similarity, photo, name in results:
        try:
            tiles.append((read_rgb(photo), f'{similarity:.3f}\n{name}', None if query_class is None
                          else name == query_class))
        except UserError as error:
            raise UserError(f'indexed photo unreadable (changed since indexing? run `search.py index` '
                            f'again): {error}') from error
    save_png(draw_retrieval(read_rgb(path), [], tiles), picture)
    print(f'{path} -> {picture} (embed {1000 * (embedded - start):.1f} ms, search '
          f'{1000 * (searched - embedded):.2f} ms over {len(searcher.table)} photos)')
    for rank, (_, similarity, photo, name) in enumerate(results, 1):
        print(f'  {rank:>3}  {similarity:.4f}  {name:<20} {photo}')
    return results


def note_incomplete(searcher):
    if not searcher.meta.get('complete', True):
        print(f"note: index '{searcher.folder}' is incomplete (its build was interrupted): {len(searcher.table)} "
              f"photos are searched; run `search.py index` again to add the rest")


# ----------------------------------------------------------------------------------------------- serve

def sketch_image(value):
    """The picture in a Gradio sketchpad or upload value, on white: a PIL image, or None when empty."""
    if value is None:
        return None
    if isinstance(value, dict):  # ImageEditor: {'background', 'layers', 'composite'}
        value = value.get('composite')
        if value is None:
            return None
    image = to_rgb8(value if isinstance(value, Image.Image) else Image.fromarray(np.asarray(value)))
    return None if np.asarray(image).min() == 255 else image  # an empty canvas


def make_app(searcher, k=8):
    """The Gradio page: a sketchpad and an upload box; every stroke or upload shows the top k photos. The
    gallery gets pictures, not paths: the server hands out copies of the result photos and no file."""
    os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')  # Gradio sends usage data out unless told not to
    # Gradio serves every file of its upload and examples folders, shared by default with every Gradio app of the
    # machine: this page gets folders of its own, so it serves only what it made itself.
    private = tempfile.mkdtemp(prefix='zs-sbir-page-')
    atexit.register(shutil.rmtree, private, True)
    os.environ.update(GRADIO_TEMP_DIR=private, GRADIO_EXAMPLES_CACHE=str(Path(private) / 'examples'))
    import gradio as gr

    def search(value, count):
        image = sketch_image(value)
        if image is None:
            return []
        results = searcher.gallery.top_k(searcher.embed_sketch(image), int(count))
        return [(ImageOps.contain(read_rgb(photo), (256, 256)), printable(f'{similarity:.3f} {name}'))
                for _, similarity, photo, name in results]

    photos = searcher.photos.relative_to(Path.cwd()) if searcher.photos.is_relative_to(Path.cwd()) else searcher.photos
    with gr.Blocks(title='Sketch search') as app:
        gr.Markdown(printable(f'### Draw a sketch: the {len(searcher.table)} photos under `{photos}` are searched '
                              f'with `{Path(searcher.meta["checkpoint"]).name}`'))
        # one column: beside another column the sketchpad's canvas is laid out wider than its box
        pad = gr.Sketchpad(label='sketch (pick the brush, then draw)', type='pil', canvas_size=(384, 384),
                           fixed_canvas=True, layers=False, transforms=(), height=460, elem_id='sketchpad',
                           brush=gr.Brush(default_size=4, colors=['#000000'], color_mode='fixed'))
        gallery = gr.Gallery(label='top photos', columns=8, height='auto', elem_id='results', format='jpeg')
        with gr.Row():
            upload = gr.Image(label='or upload a sketch', type='pil', sources=['upload'], height=200)
            count = gr.Slider(1, 32, value=k, step=1, label='photos shown')
        pad.change(search, [pad, count], gallery, show_progress='hidden')
        upload.change(search, [upload, count], gallery)
        count.release(search, [pad, count], gallery)
    app.search = search
    return app


def printable(text):
    """Text for the page: a file name's bytes that are not UTF-8 escaped (the page's JSON takes no others)."""
    return text.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')


# Routes through which Gradio fetches other URLs for a client (`file=<url>`, its old spelling `file/<url>`, `proxy=`)
FETCHING = re.compile(r'/(file[=/]\s*(https?:|//)|proxy=)', re.IGNORECASE)


def web_server(app, host, port, blocked=()):
    """A uvicorn server for the page (not started): Gradio without analytics, run history or monitoring, the
    folders in `blocked` refused on every file route, and no fetching of other URLs."""
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse
    from urllib.parse import unquote
    web = FastAPI()

    @web.middleware('http')
    async def no_fetching(request, call_next):
        if FETCHING.search(unquote(request.url.path)):
            return PlainTextResponse('not found', status_code=404)
        return await call_next(request)
    gr.mount_gradio_app(web, app, path='', run_history=False, ssr_mode=False, enable_monitoring=False,
                        mcp_server=False, allowed_paths=[], blocked_paths=[str(Path(b).resolve()) for b in blocked])
    return uvicorn.Server(uvicorn.Config(web, host=host, port=port, log_level='warning'))


def check_port(host, port):
    if not 1 <= port <= 65535:
        raise UserError(f'--port must be from 1 to 65535, got {port}')
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        why = os.strerror(error.errno) if error.errno else first_line(error)
        raise UserError(f'cannot serve on {host}:{port} ({why}): is another server there? '
                        f'choose another --port (or --host)') from error


def serve(args):
    check_device(args.device)
    check_port(args.host, args.port)
    searcher = Searcher(args.index, args.data_base, args.device, args.nprobe, args.ef_search, args.runtime,
                        args.precision)
    note_incomplete(searcher)
    server = web_server(make_app(searcher, args.num), args.host, args.port, [*searcher.photo_folders, searcher.folder])
    print(f'serving {searcher.folder} ({len(searcher.table)} photos) on http://{args.host}:{args.port}')
    server.run()


# -----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest='command', required=True)
    index = commands.add_parser('index', help='embed a folder of photos into an index')
    index.add_argument('--data_base', required=True, help='a checkpoint written by train.py or convert.py')
    index.add_argument('--photos', required=True, help='folder of photos (searched recursively)')
    index.add_argument('--index', required=True, help='the index folder to write (or update)')
    index.add_argument('--batch_size', type=int, default=64)
    index.add_argument('--workers', type=int, default=DEFAULT_WORKERS, help='data loader processes')
    index.add_argument('--save_every', type=float, default=600,
                       help='seconds between saves of what is embedded so far (a killed run loses at most this)')
    merge = commands.add_parser('merge', help='one index from shards built with the same model')
    merge.add_argument('--parts', nargs='+', required=True, help='index folders written by `index`')
    merge.add_argument('--index', required=True, help='the merged index folder to write')
    query = commands.add_parser('query', help='the top photos of the index for each sketch',
                                renamed={'--query': '--query_name'})
    query.add_argument('--index', required=True)
    query.add_argument('--query_name', nargs='+', required=True, help='sketch image files or folders')
    query.add_argument('--num', type=int, default=5, help='photos per sketch')
    query.add_argument('--save_root', default='result/search', help='where the pictures go')
    web = commands.add_parser('serve', help='a web page with a sketchpad')
    web.add_argument('--index', required=True)
    web.add_argument('--num', type=int, default=8, help='photos shown at first')
    web.add_argument('--host', default='127.0.0.1', help='127.0.0.1: this machine only; 0.0.0.0: the network')
    web.add_argument('--port', type=int, default=7860)
    for sub in (index, merge):
        sub.add_argument('--approx', default=None, choices=INDEX_KINDS,
                         help='flat: exact; ivf or hnsw: approximate, for collections in the millions (default: the '
                              "kind of the index being updated, else flat)")
        sub.add_argument('--rebuild', action='store_true',
                         help='replace an index of another model or another photos folder (index: embed everything '
                              'again)')
    for sub in (query, web):
        sub.add_argument('--data_base', default=None, help='the checkpoint (default: the one the index was built '
                                                           'with); it must be the same model')
        sub.add_argument('--nprobe', type=int, default=32, help='ivf index: lists searched per query (more: '
                                                              'slower, higher recall)')
        sub.add_argument('--ef_search', type=int, default=128, help='hnsw index: candidates kept per query '
                                                                   '(more: slower, higher recall)')
    for sub in (index, query, web):
        sub.add_argument('--device', default=default_device())
        sub.add_argument('--runtime', default='auto', choices=RUNTIMES,
                         help='what embeds the images: torch, or ONNX Runtime with the graphs exported beside the '
                              'checkpoint (docs/speed.md); auto: onnx on a CPU, where it is the faster (1.1-2x), torch '
                              'on a GPU')
        sub.add_argument('--precision', default='fp32', choices=PRECISIONS, help=PRECISION_HELP)
    return p.parse_args(argv)


def run(args):
    empty = [f'--{k}' for k, v in vars(args).items() if v == '' or (isinstance(v, list) and '' in v)]
    if empty:
        raise UserError(f'{", ".join(empty)} must not be empty')
    check_numbers(args, **({'num': Limit(1, 32)} if args.command == 'serve' else {}))  # the page shows 32 at most
    if args.command != 'merge':  # a bad device or an impossible --runtime/--precision pair: told before any photo
        check_device(args.device)
        choose_runtime(args.runtime, args.device, precision=args.precision)
    return {'index': build_index, 'merge': merge_indexes, 'query': run_query, 'serve': serve}[args.command](args)


def main(argv=None):
    return run_cli(run, parse_args(argv))


if __name__ == '__main__':
    main()
