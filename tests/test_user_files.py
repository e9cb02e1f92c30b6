"""No command loses, mixes up or exposes a user's files (docs/reliability.md): prepare.py's replacements, search.py's
index folder, locks against a second writer, resumable index builds, links and odd file names, and a web page
that hands out the result pictures and nothing else. Each case is a real run of the command."""
import json
from pathlib import Path
import os
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image

import prepare
import search
import test as retrieval
from train import main as train_main
from zs_sbir import search_index
from helpers import (DEVICE, ROOT, TINY, build, check_cli, digests, drawn_x, free_port, photo_like, raw_quickdraw,
                     running)
from prepare import read_class_list
from zs_sbir.safe_files import FOLDER_MARK, acquire_lock
from zs_sbir.synthetic import make_synthetic
from utils import scan_split


# ----------------------------------------------------------------------------------------------- prepare.py

def quickdraw(raw, data_root, *extra, sketch_top='QuickDraw_sketches_final', photo_top='QuickDraw_images_final'):
    return ['quickdraw', '--sketch_dir', raw / sketch_top, '--photo_dir', raw / photo_top, '--data_root', data_root,
            *extra]


def test_a_raw_download_inside_the_output_is_never_replaced(tmp_path, capsys):
    out = tmp_path / 'data' / 'quickdraw'  # a natural place to unpack the download
    raw_quickdraw(out)
    for extra in ((), ('--overwrite',)):
        check_cli(capsys, prepare.main, quickdraw(out, tmp_path / 'data', *extra),
                  r"QuickDraw_sketches_final' lies inside the output folder '.*quickdraw', which would be replaced",
                  unchanged=[out])
    assert sorted(p.name for p in out.iterdir()) == ['QuickDraw_images_final', 'QuickDraw_sketches_final']
    assert not [p for p in (tmp_path / 'data').iterdir() if p.name.startswith('.')]


def test_overwrite_replaces_only_a_dataset_this_repo_made(tmp_path, capsys):
    raw = raw_quickdraw(tmp_path / 'raw')
    prepare.main([str(a) for a in quickdraw(raw, tmp_path / 'data')])
    out = tmp_path / 'data' / 'quickdraw'
    assert (out / FOLDER_MARK).is_file() and len(scan_split(tmp_path / 'data', 'quickdraw', 'val').classes) == 30
    check_cli(capsys, prepare.main, quickdraw(raw, tmp_path / 'data'), 'already exists: remove it, pass --overwrite',
              unchanged=[out])
    prepare.main([str(a) for a in quickdraw(raw, tmp_path / 'data', '--overwrite', '--copy')])  # ours: replaced
    assert not (out / 'val' / 'photo' / 'bat' / 'image_1.jpg').is_symlink()
    assert not [p for p in (tmp_path / 'data').iterdir() if p.name.startswith('.')]  # no staging folder left
    # a folder the user made, and a link to one: refused before any work, left byte-identical
    mine = tmp_path / 'mine' / 'quickdraw'
    (mine / 'notes').mkdir(parents=True)
    (mine / 'notes' / 'todo.txt').write_text('mine')
    check_cli(capsys, prepare.main, quickdraw(raw, tmp_path / 'mine', '--overwrite'),
              r"was not made by this repo \(it has no .written-by-zs-sbir file\), so --overwrite does not replace it",
              unchanged=[mine])
    (tmp_path / 'linked').mkdir()
    (tmp_path / 'linked' / 'quickdraw').symlink_to(out)
    check_cli(capsys, prepare.main, quickdraw(raw, tmp_path / 'linked', '--overwrite'), 'is a symbolic link',
              unchanged=[out])
    assert sorted(p.name for p in (tmp_path / 'linked').iterdir()) == ['quickdraw']
    (mine.parent / 'synthetic').mkdir()
    (mine.parent / 'synthetic' / 'mine.txt').write_text('mine')
    check_cli(capsys, prepare.main, ['synthetic', '--data_root', mine.parent, '--overwrite'],
              'was not made by this repo', unchanged=[mine.parent])


def test_swapped_sketch_and_photo_folders_are_refused(tmp_path, capsys):
    raw = raw_quickdraw(tmp_path / 'raw', sketch_top='a', photo_top='b')  # names that say nothing
    check_cli(capsys, prepare.main, quickdraw(raw, tmp_path / 'data', sketch_top='b', photo_top='a'),
              r'--sketch_dir .*b and --photo_dir .*a look swapped \(100% of the --photo_dir images look like sketches '
              r'and 0% of the --sketch_dir images do\)')
    prepare.main([str(a) for a in quickdraw(raw, tmp_path / 'data', sketch_top='a', photo_top='b')])  # right way
    colourful = tmp_path / 'colourful'
    for c, name in enumerate(read_class_list('quickdraw_all')):  # images that do not tell: the names do
        photo_like(colourful / 'QuickDraw_sketches_final' / name / f'{c}.png', c)
        photo_like(colourful / 'QuickDraw_images_final' / name / f'{c}.jpg', 1000 + c)
    check_cli(capsys, prepare.main, quickdraw(colourful, tmp_path / 'data2', sketch_top='QuickDraw_images_final',
                                              photo_top='QuickDraw_sketches_final'), r'look swapped \(by their names\)')
    assert not (tmp_path / 'data2').exists() or not list((tmp_path / 'data2').iterdir())


def test_one_writer_of_a_generated_dataset_at_a_time(tmp_path, tiny_data, capsys):
    root = tmp_path / 'data'
    root.mkdir()
    release = acquire_lock(root / '.synthetic.lock', 'test')
    check_cli(capsys, prepare.main, ['synthetic', '--data_root', root], r"dataset '.*synthetic' is being written by "
              r"another process \(pid \d+ on .*\): wait for it, or choose another --data_root")
    assert sorted(p.name for p in root.iterdir()) == ['.synthetic.lock']
    # a first train.py waits for the one generating the dataset, then uses its dataset
    waiter = threading.Thread(target=make_synthetic, args=(root,), kwargs={**TINY, 'wait': 60})
    waiter.start()
    time.sleep(1)
    assert waiter.is_alive() and not (root / 'synthetic').exists()
    shutil.copytree(tiny_data / 'synthetic', root / 'synthetic')  # what the other process wrote
    written = digests(root / 'synthetic')
    release()
    waiter.join(30)
    assert not waiter.is_alive() and digests(root / 'synthetic') == written
    assert not (root / '.synthetic.lock').exists()


def test_two_generators_at_once_write_one_complete_dataset(tmp_path):
    import subprocess
    import sys
    argv = [sys.executable, str(ROOT / 'prepare.py'), 'synthetic', '--data_root', str(tmp_path), '--num_classes', '6',
            '--num_val_classes', '2', '--num_sketches', '3', '--num_photos', '3', '--num_val_photos', '3',
            '--img_size', '16']
    runs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(120), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results  # one after the other, or the second refused in one line
    for code, err in results:
        assert code == 0 or ('being written by another process' in err or 'already exists' in err) and \
            len(err.strip().splitlines()) == 1, err
    split = scan_split(tmp_path, 'synthetic', 'train')
    assert len(split.classes) == 4 and len(split) == 4 * 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ['synthetic']


# ----------------------------------------------------------------------------------------------- search.py

def test_an_index_update_touches_only_the_index_files(checkpoints, gallery, tmp_path, capsys):
    index = tmp_path / 'index'
    build(checkpoints[0], gallery, index)
    (index / 'notes.txt').write_text('my notes')
    build(checkpoints[0], gallery / 'photo', index / 'shard')  # a nested index of the user's
    for sibling in ('.index.old', '.index.partial'):
        (tmp_path / sibling).mkdir()
        (tmp_path / sibling / 'keep.txt').write_text(sibling)
    mine = digests(index / 'shard', tmp_path / '.index.old', tmp_path / '.index.partial')
    notes = (index / 'notes.txt').read_bytes()
    shutil.copy(gallery / 'photo' / sorted(os.listdir(gallery / 'photo'))[0], gallery / 'photo' / 'new.png')
    meta = build(checkpoints[0], gallery, index)
    assert meta['count'] == 21 and '20 unchanged, 1 to embed' in capsys.readouterr().out
    assert (index / 'notes.txt').read_bytes() == notes
    assert digests(index / 'shard', tmp_path / '.index.old', tmp_path / '.index.partial') == mine
    names = json.loads((index / 'meta.json').read_text())['files']
    assert sorted(p.name for p in index.iterdir()) == sorted(['meta.json', 'notes.txt', 'shard', *names.values()])


def test_replacing_an_index_of_other_photos_or_another_model_needs_rebuild(checkpoints, gallery, tmp_path, capsys):
    index = tmp_path / 'index'
    build(checkpoints[0], gallery / 'photo', index)
    kept = digests(index)
    check_cli(capsys, search.main, ['index', '--data_base', checkpoints[0], '--photos', gallery / 'drawing', '--index',
                                    index, '--workers', 0], r"holds the photos of '.*photo', not of '.*drawing': pass "
                                                            r"--rebuild to replace it", unchanged=[index])
    build(checkpoints[1], gallery / 'drawing', tmp_path / 'other')
    check_cli(capsys, search.main, ['merge', '--parts', tmp_path / 'other', '--index', index],
              r"index '.*index' was built with another model .*: pass --rebuild", unchanged=[index])
    assert digests(index) == kept
    meta = build(checkpoints[0], gallery / 'drawing', index, '--rebuild')
    assert meta['photos'] == str((gallery / 'drawing').resolve()) and meta['count'] == 10


def test_a_second_writer_of_an_index_is_refused(checkpoints, gallery, tmp_path, capsys):
    index = tmp_path / 'index'
    build(checkpoints[0], gallery, index)
    kept = digests(index)
    release = acquire_lock(index / search_index.LOCK, 'test')
    try:
        argv = ['index', '--data_base', checkpoints[0], '--photos', gallery, '--index', index, '--workers', 0]
        check_cli(capsys, search.main, argv, r"index '.*index' is being written by another process \(pid \d+",
                  unchanged=[index])
        check_cli(capsys, search.main, ['merge', '--parts', index, '--index', index], 'is being written by another')
    finally:
        release()
    assert digests(index) == kept


def test_an_interrupted_first_build_keeps_what_it_embedded(checkpoints, gallery, tmp_path, capsys, monkeypatch):
    index, calls, embed = tmp_path / 'index', [], search.embed_as

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return embed(*args)
    monkeypatch.setattr(search, 'embed_as', interrupted)
    with pytest.raises(SystemExit) as exit_info:
        build(checkpoints[0], gallery, index, '--batch_size', 4)
    assert exit_info.value.code == 130 and 'kept the 8 photos embedded so far' in capsys.readouterr().out
    meta, table, _ = search_index.read_index(index)
    assert meta['complete'] is False and len(table) == 8
    monkeypatch.setattr(search, 'embed_as', embed)
    meta = build(checkpoints[0], gallery, index, '--batch_size', 4)
    assert '8 unchanged, 12 to embed' in capsys.readouterr().out and meta['complete'] and meta['count'] == 20
    # a periodic save: every batch with --save_every 0, so that even kill -9 loses at most one interval
    writes = []
    monkeypatch.setattr(search, 'write_index', lambda *a, **k: writes.append(a[1]['complete']) or
                        search_index.write_index(*a, **k))
    build(checkpoints[0], gallery, tmp_path / 'again', '--batch_size', 4, '--save_every', 0)
    assert writes == [False] * 5 + [True]


def test_links_are_followed_once_and_unreadable_folders_listed(checkpoints, gallery, tmp_path, capsys, monkeypatch):
    photos = tmp_path / 'photos'
    (photos / 'own').mkdir(parents=True)
    shutil.copy(sorted((gallery / 'photo').iterdir())[0], photos / 'own' / 'a.png')
    (photos / 'linked').symlink_to(gallery / 'drawing')  # a class folder linked in
    (photos / 'own' / 'loop').symlink_to(photos)  # a loop
    (photos / 'dangling.png').symlink_to(tmp_path / 'gone.png')
    (photos / '.hidden').mkdir()
    shutil.copy(photos / 'own' / 'a.png', photos / '.hidden' / 'b.png')
    (photos / 'locked').mkdir()
    shutil.copy(photos / 'own' / 'a.png', photos / 'locked' / 'c.png')
    scandir = os.scandir

    def refusing(path):
        if str(path).endswith('locked'):
            raise PermissionError(13, 'Permission denied', str(path))
        return scandir(path)
    monkeypatch.setattr(os, 'scandir', refusing)
    meta = build(checkpoints[0], photos, tmp_path / 'index')
    out = capsys.readouterr().out
    _, table, _ = search_index.read_index(tmp_path / 'index')
    assert sorted(row['path'] for row in table) == ['linked/' + p for p in sorted(os.listdir(gallery / 'drawing'))] + \
        ['own/a.png']
    assert any(line.endswith("locked' cannot be read (Permission denied)") for line in meta['skipped'])
    assert any(line.endswith("dangling.png' is a link to nothing") for line in meta['skipped'])
    assert "locked': it cannot be read (Permission denied)" in out


def test_query_pictures_stay_out_of_the_photos_and_never_overwrite_each_other(checkpoints, gallery, tmp_path, capsys):
    index = tmp_path / 'index'
    build(checkpoints[0], gallery, index)
    check_cli(capsys, search.main, ['query', '--index', index, '--query_name', gallery / 'photo', '--save_root',
                                    gallery / 'photo' / 'results'],
              r"--save_root '.*results' is inside a photos folder of the index '.*gallery'", unchanged=[gallery])
    twins = [tmp_path / folder / 'cat.png' for folder in ('a', 'b')]
    for twin, colour in zip(twins, ('black', 'grey')):
        twin.parent.mkdir()
        image = drawn_x(64)
        image.paste(colour, (0, 0, 8, 8))
        image.save(twin)
    search.main(['query', '--index', str(index), '--query_name', *map(str, twins), '--save_root', str(tmp_path / 'out'),
                 '--device', DEVICE])
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['cat.png', 'cat_.png']


def test_an_approximate_index_stays_approximate(checkpoints, gallery, tmp_path, capsys):
    index = tmp_path / 'index'
    meta = build(checkpoints[0], gallery, index, '--approx', 'ivf')
    assert (meta['approx'], meta['kind']) == ('ivf', 'flat')  # too few photos for IVF: exact until there are more
    assert 'fewer than 1000 photos: searched exactly' in capsys.readouterr().out
    assert build(checkpoints[0], gallery, index)['approx'] == 'ivf'  # an update keeps the kind asked for
    meta = build(checkpoints[0], gallery, index, '--approx', 'flat')
    assert meta['approx'] == 'flat' and 'index kind: ivf -> flat (as --approx asks)' in capsys.readouterr().out
    # a real IVF index: the FAISS file missing or damaged is one line
    meta, table, vectors = search_index.read_index(index)
    rng = np.random.default_rng(0)
    many = rng.normal(size=(2000, vectors.shape[1])).astype(np.float32)
    many /= np.linalg.norm(many, axis=1, keepdims=True)
    rows = [{'path': f'photo/{i}.png', 'size': 1, 'mtime_ns': 1} for i in range(2000)]
    release = acquire_lock(index / search_index.LOCK, 'test')
    assert search.commit(index, meta, rows, many, 'ivf', complete=True)['kind'] == 'ivf'
    release()
    faiss_file = index / json.loads((index / 'meta.json').read_text())['files']['index']
    assert search_index.Searcher(index).gallery.index.ntotal == 2000
    query = ['query', '--index', index, '--query_name', gallery / 'drawing', '--save_root', tmp_path / 'q']
    faiss_file.write_bytes(b'not a faiss index')
    check_cli(capsys, search.main, query, r"index '.*index': 'index-.*\.faiss' is missing or not a FAISS index: run "
                                          r"`search.py index` on it again")
    faiss_file.unlink()
    check_cli(capsys, search.main, query, 'is missing or not a FAISS index')


@pytest.mark.parametrize('meta', ['[1, 2]', '"text"', '{"format": "zs-sbir-index-2"}', '{not json'])
def test_a_damaged_meta_json_is_one_line(checkpoints, gallery, tmp_path, capsys, meta):
    index = tmp_path / 'index'
    build(checkpoints[0], gallery, index)
    (index / 'meta.json').write_text(meta)
    check_cli(capsys, search.main, ['query', '--index', index, '--query_name', gallery], r"index '.*index': meta.json ")
    check_cli(capsys, search.main, ['index', '--data_base', checkpoints[0], '--photos', gallery, '--index', index],
              r"index '.*index': meta.json ", unchanged=[index])


def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.mark.web
def test_the_page_hands_out_the_results_and_no_file(checkpoints, gallery, tmp_path):
    """Every request path an attacker might try, against the running server: no file comes back, whatever
    its place (under the photos folder, hidden there, the index, the system), and no other URL is fetched."""
    (gallery / '.env').write_text('SECRET=hunter2')
    (gallery / 'photo' / 'notes.txt').write_text('SECRET in notes')
    build(checkpoints[0], gallery, tmp_path / 'index')
    searcher = search_index.Searcher(tmp_path / 'index')
    app = search.make_app(searcher, 4)
    assert app.analytics_enabled is False
    port = free_port()
    server = running(search.web_server(app, '127.0.0.1', port, [searcher.photos, searcher.folder]))
    base = f'http://127.0.0.1:{port}'
    photo = sorted((gallery / 'photo').iterdir())[0]
    secret_files = [gallery / '.env', gallery / 'photo' / 'notes.txt', photo, tmp_path / 'index' / 'meta.json',
                    '/etc/passwd']
    try:
        assert fetch(base + '/')[0] == 200  # the page itself
        for path in secret_files:
            for route in ('/gradio_api/file=', '/file=', '/gradio_api/file/'):
                for spelling in (str(path), urllib.parse.quote(str(path)), '..' * 8 + str(path)):
                    status, body = fetch(base + route + spelling)
                    assert status != 200 and b'SECRET' not in body and b'root:' not in body, (route, spelling)
        for path in ('/static/../../../../etc/passwd', '/assets/..%2f..%2f..%2fetc%2fpasswd',
                     f'/gradio_api/proxy=http://127.0.0.1:{port}/config', f'/gradio_api/file=http://127.0.0.1:{port}/',
                     '/gradio_api/file=//127.0.0.1/etc/passwd', '/gradio_api/runs', '/monitoring'):
            status, body = fetch(base + path)
            assert status != 200 or b'root:' not in body and b'SECRET' not in body, path
            assert status in (403, 404, 405) or b'<html' in body[:200].lower(), (path, status)
    finally:
        server.should_exit = True


@pytest.mark.parametrize('port, match', [(99999, '--port must be from 1 to 65535, got 99999'),
                                         (-1, '--port must be from 1 to 65535, got -1'),
                                         ('busy', r'cannot serve on 127.0.0.1:\d+ \(Address already in use\)')])
def test_serve_refuses_a_bad_or_busy_port(checkpoints, gallery, tmp_path, capsys, port, match):
    import socket
    build(checkpoints[0], gallery, tmp_path / 'index')
    with socket.create_server(('127.0.0.1', 0)) as busy:
        port = busy.getsockname()[1] if port == 'busy' else port
        check_cli(capsys, search.main, ['serve', '--index', tmp_path / 'index', '--port', port], match)


def test_any_file_name_is_indexed_queried_and_printed(checkpoints, gallery, tmp_path, capsys):
    photos = tmp_path / 'photos'
    names = ['new\nline.png', 'ünïcødé 猫.png', 'sp ace,comma"quote.png', os.fsdecode(b'bytes\xff.png')]
    sources = sorted((gallery / 'drawing').iterdir())
    for name, source in zip(names, sources):
        (photos / 'cls').mkdir(parents=True, exist_ok=True)
        shutil.copy(source, photos / 'cls' / name)
    meta = build(checkpoints[0], photos, tmp_path / 'index')
    _, table, _ = search_index.read_index(tmp_path / 'index')
    assert meta['count'] == 4 and sorted(row['path'] for row in table) == sorted(f'cls/{n}' for n in names)
    query = photos / 'cls' / names[3]
    answers = search.main(['query', '--index', str(tmp_path / 'index'), '--query_name', str(query), '--save_root',
                           str(tmp_path / 'out'), '--device', DEVICE, '--num', '4'])
    assert sorted(str(hit.path.name) for hit in answers[0]) == sorted(names)
    assert answers[0][0].path.name == names[3]  # a photo is its own best match
    assert [p.name for p in (tmp_path / 'out').iterdir()] == [os.fsdecode(b'bytes\xff.png')]


# ----------------------------------------------------------------------------------------------- probe round 3

@pytest.mark.web
def test_serve_fetches_no_url_and_no_file_of_other_gradio_apps(checkpoints, gallery, tmp_path):
    import tempfile
    shared = Path(tempfile.gettempdir()) / 'gradio' / 'zzprobe'  # Gradio's folder shared by every app
    shared.mkdir(parents=True, exist_ok=True)
    (shared / 'secret.txt').write_text('SECRET of another app')
    build(checkpoints[0], gallery, tmp_path / 'index')
    searcher = search_index.Searcher(tmp_path / 'index')
    port = free_port()
    server = running(search.web_server(search.make_app(searcher, 4), '127.0.0.1', port, [searcher.photos]))
    base = f'http://127.0.0.1:{port}'
    try:
        for path in (f'/gradio_api/file={shared / "secret.txt"}', f'/gradio_api/file/{shared / "secret.txt"}',
                     '/gradio_api/file/http://1.1.1.1/', '/gradio_api/file/HTTPS://93.184.215.14/',
                     '/gradio_api/file=http://1.1.1.1/'):
            status, body = fetch(base + path)
            assert status in (403, 404) and b'SECRET' not in body, (path, status)
    finally:
        server.should_exit = True
        shutil.rmtree(shared, ignore_errors=True)


def test_a_meta_json_never_names_files_outside_the_index(checkpoints, gallery, tmp_path, capsys):
    index = tmp_path / 'index'
    build(checkpoints[0], gallery, index)
    victim = tmp_path / 'victim.txt'
    victim.write_text('mine')
    meta = json.loads((index / 'meta.json').read_text())
    (index / 'vectors-0123456789ab.npy').write_bytes(b'my own file, named like an index file')
    for files in ({**meta['files'], 'index': str(victim)}, {**meta['files'], 'table': '../victim.txt'},
                  list(meta['files'].values())):
        (index / 'meta.json').write_text(json.dumps({**meta, 'files': files}))
        check_cli(capsys, search.main, ['index', '--data_base', checkpoints[0], '--photos', gallery, '--index', index,
                                        '--workers', 0], r"meta.json is not that of an index of search.py")
        assert victim.read_text() == 'mine'
    build(checkpoints[0], gallery, index, '--rebuild')  # a damaged index: --rebuild replaces it
    assert victim.read_text() == 'mine' and (index / 'vectors-0123456789ab.npy').is_file()  # never named: kept
    build(checkpoints[0], gallery, index)
    assert (index / 'vectors-0123456789ab.npy').read_bytes().startswith(b'my own file')
    meta = json.loads((index / 'meta.json').read_text())
    for damage in ({'photos': None}, {'files': 'vectors.npy'}, {'kind': 'ann'}):
        (index / 'meta.json').write_text(json.dumps({**meta, **damage}))
        check_cli(capsys, search.main, ['query', '--index', index, '--query_name', gallery], 'meta.json is not that')
    (index / 'meta.json').write_text(json.dumps(meta))
    np.save(index / meta['files']['vectors'], np.zeros((20, 3), np.float32))  # another model's width
    check_cli(capsys, search.main, ['query', '--index', index, '--query_name', gallery], r'is damaged')


def test_shards_of_unrelated_folders_merge_and_query(checkpoints, gallery, tmp_path, capsys):
    elsewhere = tmp_path / 'far' / 'away' / 'photos'
    shutil.copytree(gallery / 'photo', elsewhere)
    build(checkpoints[0], gallery / 'drawing', tmp_path / 'a')
    build(checkpoints[0], elsewhere, tmp_path / 'b')
    search.main(['merge', '--parts', str(tmp_path / 'a'), str(tmp_path / 'b'), '--index', str(tmp_path / 'merged')])
    out = tmp_path / 'gallery' / 'pictures'  # under the shards' common folder, in neither shard's
    answers = search.main(['query', '--index', str(tmp_path / 'merged'), '--query_name', str(gallery / 'drawing'),
                           '--save_root', str(out), '--device', DEVICE, '--num', '3'])
    assert len(answers) == 10 and len(list(out.glob('*.png'))) == 10
    check_cli(capsys, search.main, ['query', '--index', tmp_path / 'merged', '--query_name', gallery / 'drawing',
                                    '--save_root', elsewhere / 'x'], 'is inside a photos folder of the index')


@pytest.mark.parametrize('argv, match', [
    (['query', '--ef_search', str(2 ** 31)], '--ef_search must be from 1 to 2147483647, got 2147483648'),
    (['query', '--nprobe', str(2 ** 64)], '--nprobe must be from 1 to 2147483647, got 18446744073709551616'),
    (['serve', '--num', '100'], '--num must be from 1 to 32, got 100'),
    (['serve', '--num', '0'], '--num must be from 1 to 32, got 0'),
    (['index', '--batch_size', str(10 ** 20)], '--batch_size must be from 1 to 65536'),
    (['index', '--workers', str(10 ** 20)], '--workers must be from 0 to 64'),
])
def test_huge_option_values_are_one_line(checkpoints, gallery, tmp_path, capsys, argv, match):
    command, extra = argv[0], argv[1:]
    base = {'query': ['--index', tmp_path, '--query_name', gallery], 'serve': ['--index', tmp_path],
            'index': ['--data_base', checkpoints[0], '--photos', gallery, '--index', tmp_path / 'i']}[command]
    check_cli(capsys, search.main, [command, *base, *extra], match)


def test_huge_values_in_other_commands(tiny_data, tmp_path, capsys):
    import convert
    check_cli(capsys, convert.main, ['--extractor', 'e', '--generator', 'g', '--save', tmp_path / 'c.pth', '--emb_dim',
                                     str(10 ** 11)], '--emb_dim must be from 1 to 65536')
    check_cli(capsys, prepare.main, ['cache', '--data_root', tiny_data, '--data_name', 'synthetic', '--img_size',
                                     str(2 ** 40)], '--img_size must be a multiple of 4 from 32 to 2048',
              unchanged=[tiny_data])
    check_cli(capsys, prepare.main, ['cache', '--data_root', tiny_data, '--data_name', 'synthetic', '--workers',
                                     str(10 ** 20)], '--workers must be from 1 to 64', unchanged=[tiny_data])
    check_cli(capsys, retrieval.main, ['--evaluate', '--workers', str(10 ** 20)], '--workers must be from 0 to 64')
    assert not list((tiny_data / 'synthetic').glob('cache/*.tmp'))


def test_prepare_keeps_every_photo_and_says_what_it_leaves_out(tmp_path, capsys):
    raw = raw_quickdraw(tmp_path / 'raw')
    extra = tmp_path / 'extra'
    for c, name in enumerate(read_class_list('quickdraw_all')):
        photo_like(extra / name / f'image_{c}.jpg', 5000 + c)  # the same name as a photo of the first folder
    photo_like(raw / 'QuickDraw_images_final' / 'bat' / f'image_{read_class_list("quickdraw_all").index("bat")}__1.jpg',
               77)  # and the name the second one would get
    (raw / 'QuickDraw_images_final' / 'bat' / 'sub').mkdir()
    photo_like(raw / 'QuickDraw_images_final' / 'bat' / 'b.webp', 78)
    for copy in ((), ('--copy',)):
        prepare.main([str(a) for a in quickdraw(raw, tmp_path / f'data{len(copy)}')[:5]] + [
            str(extra), '--data_root', str(tmp_path / f'data{len(copy)}'), *copy])
        out = capsys.readouterr().out
        bat = tmp_path / f'data{len(copy)}' / 'quickdraw' / 'val' / 'photo' / 'bat'
        assert len(list(bat.iterdir())) == 3 and len({p.read_bytes() for p in bat.iterdir()}) == 3
        assert "left out 2 entries of class folders that are not .jpg/.jpeg/.png files" in out
        assert oct(os.stat(bat.parents[3]).st_mode & 0o777) != '0o700'
    mine = tmp_path / 'mine.png'
    Image.new('RGB', (4, 4)).save(mine)
    check_cli(capsys, prepare.main, ['synthetic', '--data_root', tmp_path / 'new', '--preview', mine],
              "file '.*mine.png' exists and was not written by this repo: choose another --preview",
              unchanged=[tmp_path / 'data0'])
    assert not (tmp_path / 'new').exists()


def test_a_dangling_link_at_an_output_path_is_refused(checkpoints, gallery, tmp_path, capsys):
    build(checkpoints[0], gallery, tmp_path / 'index')
    query = sorted((gallery / 'drawing').iterdir())[0]
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / f'{query.stem}.png').symlink_to(tmp_path / 'nowhere.png')
    check_cli(capsys, search.main, ['query', '--index', tmp_path / 'index', '--query_name', query, '--save_root',
                                    tmp_path / 'out'], 'is a link to nothing, which this repo does not replace')
    assert (tmp_path / 'out' / f'{query.stem}.png').is_symlink()


@pytest.mark.web
def test_the_page_takes_names_that_are_not_utf8(checkpoints, gallery, tmp_path):
    photos = tmp_path / os.fsdecode(b'ph\xffotos')
    shutil.copytree(gallery / 'drawing', photos / os.fsdecode(b'cl\xffass'))
    build(checkpoints[0], photos, tmp_path / 'index')
    searcher = search_index.Searcher(tmp_path / 'index')
    app = search.make_app(searcher, 3)
    shown = app.search({'composite': drawn_x()}, 3)
    assert len(shown) == 3 and all(caption.endswith('cl\\xffass') for _, caption in shown)
    port = free_port()
    server = running(search.web_server(app, '127.0.0.1', port, [searcher.photos]))
    try:
        status, body = fetch(f'http://127.0.0.1:{port}/')
        assert status == 200
    finally:
        server.should_exit = True


def test_an_index_of_the_earlier_format_is_read_and_updated(checkpoints, gallery, tmp_path, capsys):
    index = tmp_path / 'index'
    build(checkpoints[0], gallery, index)
    meta = json.loads((index / 'meta.json').read_text())
    for key, name in (('vectors', 'vectors.npy'), ('table', 'files.csv')):  # format 1: fixed names, no 'files'
        (index / meta['files'][key]).rename(index / name)
    (index / 'meta.json').write_text(json.dumps({**{k: v for k, v in meta.items() if k != 'files'},
                                                 'format': 'zs-sbir-index-1'}))
    assert len(search_index.Searcher(index).table) == 20
    capsys.readouterr()
    meta = build(checkpoints[0], gallery, index)
    assert '20 unchanged, 0 to embed' in capsys.readouterr().out and meta['format'] == 'zs-sbir-index-2'
    assert not (index / 'vectors.npy').exists() and not (index / 'files.csv').exists()


def test_any_file_name_trains_evaluates_and_is_drawn(tiny_data, tmp_path, capsys):
    """A dataset with a file name that is not UTF-8 (bytes 0xff) and a damaged QOI image: train.py with
    --skip_bad_images trains and lists the image, test.py evaluates and draws, --resume accepts the same data."""
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    photo_class = sorted((data / 'synthetic' / 'val' / 'photo').iterdir())[0]
    first = sorted(photo_class.iterdir())[0]
    shutil.copy(first, photo_class / os.fsdecode(b'odd\xff.jpg'))
    (photo_class / 'damaged.png').write_bytes(b'qoif' + b'\x00' * 20)  # a PNG name, bytes that decode to nothing
    out = tmp_path / 'run'
    argv = ['--data_root', data, '--data_name', 'synthetic', '--no_pretrained', '--img_size', '32', '--batch_size',
            '8', '--workers', '0', '--emb_dim', '8', '--device', DEVICE, '--save_root', out, '--skip_bad_images']
    train_main([str(a) for a in argv + ['--epochs', '1']])
    assert (out / 'synthetic_acnet_resnet50_8_bad_images.txt').read_text().strip().endswith('damaged.png')
    train_main([str(a) for a in argv + ['--epochs', '2', '--resume']])
    metrics = retrieval.main(['--evaluate', '--data_base', str(out / 'synthetic_acnet_resnet50_8_model.pth'),
                              '--workers', '0', '--device', DEVICE])
    assert 0 <= metrics['precise'] <= 1
    retrieval.main(['--data_base', str(out / 'synthetic_acnet_resnet50_8_model.pth'), '--query_name',
                    str(photo_class / os.fsdecode(b'odd\xff.jpg')), '--save_root', str(tmp_path / 'pictures'),
                    '--device', DEVICE, '--num', '30'])
    assert os.fsdecode(b'odd\xff.png') in os.listdir(tmp_path / 'pictures')
    assert 'Traceback' not in capsys.readouterr().err
