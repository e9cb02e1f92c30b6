"""search.py: indexing a photo folder (incremental, atomic, unreadable files skipped), exact and
approximate queries against an independent ranking, the web page's function, the page itself in a
headless Chromium with strokes drawn on its canvas, and bad input."""
import json
import os
import re
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import search
from zs_sbir import search_index
from zs_sbir.retrieval import model_from_checkpoint
from zs_sbir.checkpoint import CHECKPOINT_FORMAT, load_torch
from zs_sbir.images import load_image
from zs_sbir.safe_files import written_by_this_repo
from utils import PHOTO, SKETCH
from helpers import DEVICE, build, cli_checker, drawn_x, free_port, running  # fixtures: checkpoints, gallery


check_error = cli_checker(search.main)


def test_index_is_incremental_atomic_and_skips_unreadable_files(checkpoints, gallery, tmp_path, capsys):
    index = tmp_path / 'index'
    meta = build(checkpoints[0], gallery, index)
    assert meta['count'] == 20 and meta['kind'] == 'flat' and meta['unreadable'] == [] and meta['complete']
    names = json.loads((index / 'meta.json').read_text())['files']
    assert 'to embed' in capsys.readouterr().out and sorted(p.name for p in index.iterdir()) == \
        sorted(['meta.json', names['table'], names['vectors']])  # an exact index needs no FAISS file
    vectors = np.load(index / names['vectors'])
    first = sorted(gallery.rglob('*.*'))[0]
    # the stored vectors are the model's photo embeddings, row by row
    model = model_from_checkpoint(load_torch(checkpoints[0], CHECKPOINT_FORMAT, 'checkpoint'))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.embed(load_image(first, 32, 'bicubic')[None],
                                                             torch.tensor([PHOTO])), dim=1)[0]
    assert np.allclose(vectors[0], expected.numpy(), atol=1e-5)
    # unchanged: nothing embedded; a changed, a new, a deleted and an unreadable file
    build(checkpoints[0], gallery, index)
    assert '20 unchanged, 0 to embed' in capsys.readouterr().out
    shutil.copy(sorted((gallery / 'photo').iterdir())[1], first)  # new content under the old name
    shutil.copy(first, gallery / 'photo' / 'new.png')
    sorted((gallery / 'photo').iterdir())[-1].unlink()
    (gallery / 'photo' / 'junk.jpg').write_bytes(b'not a jpeg')
    meta = build(checkpoints[0], gallery, index)
    out = capsys.readouterr().out
    assert '21 images under' in out and '18 unchanged, 3 to embed' in out and 'skipped 1 files that do not decode' in out
    assert meta['count'] == 20 and meta['unreadable'] == ['photo/junk.jpg']
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]  # nothing left beside the index
    names = json.loads((index / 'meta.json').read_text())['files']
    assert sorted(p.name for p in index.iterdir()) == sorted(['meta.json', *names.values()])  # old files gone


def test_exact_queries_rank_as_test_py_and_draw_its_picture(checkpoints, gallery, tmp_path, capsys, tiny_data):
    index = tmp_path / 'index'
    build(checkpoints[0], gallery, index)
    queries = sorted((tiny_data / 'synthetic' / 'val' / 'sketch').rglob('*.png'))[:3]
    answers = search.main(['query', '--index', str(index), '--query_name', *map(str, queries), '--num', '5',
                           '--save_root', str(tmp_path / 'pictures'), '--device', DEVICE])
    model = model_from_checkpoint(load_torch(checkpoints[0], CHECKPOINT_FORMAT, 'checkpoint'))
    photos = sorted(str(p.relative_to(gallery)) for p in gallery.rglob('*.*'))
    with torch.no_grad():
        g = model.embed(torch.stack([load_image(gallery / p, 32, 'bicubic') for p in photos]), torch.full((20,), PHOTO))
        q = model.embed(torch.stack([load_image(p, 32, 'bicubic') for p in queries]), torch.full((3,), SKETCH))
    g, q = torch.nn.functional.normalize(g, dim=1), torch.nn.functional.normalize(q, dim=1)
    for results, query in zip(answers, q):
        similarity = (g @ query).double()
        order = sorted(range(len(photos)), key=lambda i: (-similarity[i].item(), i))[:5]  # best first, ties: lower
        assert [str(hit.path.relative_to(gallery)) for hit in results] == [photos[i] for i in order]
        assert [hit.similarity for hit in results] == pytest.approx([similarity[i].item() for i in order], abs=1e-5)
    out = capsys.readouterr().out
    assert re.search(r'embed \d+\.\d ms, search \d+\.\d\d ms over 20 photos', out)
    assert written_by_this_repo(tmp_path / 'pictures' / f'{queries[0].stem}.png')


def test_shards_merge_into_the_index_of_the_whole_folder(checkpoints, gallery, tmp_path, capsys):
    whole = build(checkpoints[0], gallery, tmp_path / 'whole')
    for name in ('drawing', 'photo'):  # one job per folder, as on several machines
        build(checkpoints[0], gallery / name, tmp_path / f'part-{name}')
    parts = [str(tmp_path / 'part-drawing'), str(tmp_path / 'part-photo'), str(tmp_path / 'part-photo')]
    merged = search.main(['merge', '--parts', *parts, '--index', str(tmp_path / 'merged'), '--approx', 'ivf'])
    assert '(flat index (fewer than 1000 photos: searched exactly))' in capsys.readouterr().out  # said, as index says
    assert (merged['kind'], merged['approx']) == ('flat', 'ivf')  # too few to train IVF lists: exact until it grows
    assert merged['photos'] == whole['photos'] and merged['count'] == 20 and merged['model'] == whole['model']
    _, whole_table, whole_vectors = search_index.read_index(tmp_path / 'whole')
    _, table, vectors = search_index.read_index(tmp_path / 'merged')
    assert [row['path'] for row in table] == [row['path'] for row in whole_table]  # the repeated shard counts once
    assert np.allclose(vectors, whole_vectors, atol=1e-5)
    # the merged index is an ordinary one: updating it from the common folder embeds nothing
    capsys.readouterr()
    build(checkpoints[0], gallery, tmp_path / 'merged')
    assert '20 unchanged, 0 to embed' in capsys.readouterr().out
    build(checkpoints[1], gallery / 'photo', tmp_path / 'other-model')
    check_error(capsys, ['merge', '--parts', tmp_path / 'part-drawing', tmp_path / 'other-model', '--index',
                         tmp_path / 'bad'], r"were built with different models")
    assert not (tmp_path / 'bad').exists()


@pytest.mark.parametrize('kind', ['ivf', 'hnsw'])
def test_approximate_indexes_find_the_exact_neighbours(kind):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 64))
    vectors = centres[rng.integers(50, size=5000)] + 0.3 * rng.normal(size=(5000, 64))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    queries = vectors[:100] + 0.05 * rng.normal(size=(100, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    approximate = search_index.build_faiss(vectors, kind)
    assert type(approximate).__name__ == {'ivf': 'IndexIVFFlat', 'hnsw': 'IndexHNSWFlat'}[kind]
    exact = np.argsort(-(queries @ vectors.T), axis=1, kind='stable')[:, :10]

    def recall(**settings):
        _, found = search_index.tune(approximate, **settings).search(queries, 10)
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
    assert recall() >= 0.95  # the defaults search.py uses (nprobe 32, efSearch 128)
    if kind == 'ivf':  # probing every list is exhaustive; one list misses neighbours across borders
        assert recall(nprobe=approximate.nlist) == 1.0 and recall(nprobe=1) < recall()
    else:
        assert recall(ef_search=512) >= recall(ef_search=10) and recall(ef_search=10) < 1.0


@pytest.mark.web
def test_the_page_function_finds_drawings_for_a_drawing(checkpoints, gallery, tmp_path):
    build(checkpoints[0], gallery, tmp_path / 'index')
    app = search.make_app(search_index.Searcher(tmp_path / 'index'), 5)
    shown = app.search({'background': None, 'layers': [], 'composite': drawn_x()}, 5)
    assert len(shown) == 5 and all(caption.endswith(' drawing') for _, caption in shown)
    # pictures, not paths: the page hands out copies of the result photos, never a file of the machine
    searcher = search_index.Searcher(tmp_path / 'index')
    top = searcher.gallery.top_k(searcher.embed_sketch(drawn_x()), 5)
    for (picture, _), (_, _, path, _) in zip(shown, top):
        assert isinstance(picture, Image.Image) and np.array_equal(np.asarray(picture), np.asarray(
            ImageOps.contain(Image.open(path).convert('RGB'), (256, 256))))
    assert app.search(None, 5) == [] and app.search({'composite': Image.new('RGBA', (9, 9), (0, 0, 0, 0))}, 5) == []


@pytest.mark.web
def test_drawing_in_a_real_browser_shows_drawings(checkpoints, gallery, tmp_path):
    """Chromium (headless, Debian's) opens the page; the brush draws an X; the strokes reach the server and
    the page shows exactly the searcher's top 6 for what it received, mostly drawings."""
    from selenium import webdriver
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    index = os.environ.get('ZS_SBIR_INDEX')  # README's picture: an index of the README's commands
    if not index:
        build(checkpoints[0], gallery, tmp_path / 'index')
    searcher = search_index.Searcher(index or tmp_path / 'index')
    received, embed = [], searcher.embed_sketch
    searcher.embed_sketch = lambda image: embed(received.append(image.copy()) or image)
    port = free_port()
    server = running(search.web_server(search.make_app(searcher, 6), '127.0.0.1', port, [searcher.photos]))
    options = webdriver.ChromeOptions()
    for flag in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync',
                 '--window-size=1400,1000', f'--user-data-dir={tmp_path / "profile"}'):
        options.add_argument(flag)
    options.binary_location = shutil.which('chromium') or '/usr/bin/chromium'
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(shutil.which('chromedriver') or '/usr/bin/chromedriver'))
    try:
        driver.get(f'http://127.0.0.1:{port}')
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, 'button[aria-label="Brush"]'))
        driver.find_element(By.CSS_SELECTOR, 'button[aria-label="Brush"]').click()
        canvas = driver.find_elements(By.CSS_SELECTOR, '#sketchpad canvas')[-1]
        for start, step in (((-60, -80), (4, 8)), ((20, -80), (-4, 8))):
            strokes = ActionChains(driver).move_to_element_with_offset(canvas, *start).click_and_hold()
            for _ in range(20):
                strokes.move_by_offset(*step)
            strokes.release().perform()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '#results img')) >= 6)
        time.sleep(1)
        captions = [image.get_attribute('alt') for image in driver.find_elements(By.CSS_SELECTOR, '#results img')]
        drawn = np.asarray(received[-1].convert('L')) < 128  # the X: dark pixels on both diagonals
        half = drawn.shape[0] // 2
        assert 200 < drawn.sum() < 0.2 * drawn.size and drawn[:half, :half].any() and drawn[half:, :half].any()
        expected = [f'{hit.similarity:.3f} {hit.name}' for hit in searcher.gallery.top_k(embed(received[-1]), 6)]
        assert captions == expected
        assert index or sum(caption.endswith(' drawing') for caption in captions) >= 4, captions
        driver.save_screenshot(str(tmp_path / 'page.png'))
        if os.environ.get('ZS_SBIR_SCREENSHOT'):  # README's picture: ZS_SBIR_SCREENSHOT=result/search_page.png
            shutil.copy(tmp_path / 'page.png', os.environ['ZS_SBIR_SCREENSHOT'])
    finally:
        driver.quit()
        server.should_exit = True


def test_bad_inputs_are_one_line_and_write_nothing(checkpoints, gallery, tmp_path, capsys):
    index = tmp_path / 'index'
    base = ['index', '--data_base', checkpoints[0], '--index', index, '--workers', 0, '--device', DEVICE]
    check_error(capsys, [*base, '--photos', tmp_path / 'nowhere'], r"--photos folder not found: '.*nowhere'")
    (tmp_path / 'empty').mkdir()
    check_error(capsys, [*base, '--photos', tmp_path / 'empty'], r"--photos folder '.*empty' holds no image file")
    vectors = checkpoints[0].with_name('synthetic_msedge_resnet50_8_vectors.pth')
    check_error(capsys, ['index', '--data_base', vectors, '--photos', gallery, '--index', index],
                'is not a checkpoint of this repo')
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('mine')
    check_error(capsys, ['index', '--data_base', checkpoints[0], '--photos', gallery, '--index', tmp_path / 'mine'],
                r"'.*mine' exists and is not an index of search.py")
    assert not index.exists() and (tmp_path / 'mine' / 'notes.txt').read_text() == 'mine'
    build(checkpoints[0], gallery, index)
    before = {p.name: p.read_bytes() for p in index.iterdir()}
    check_error(capsys, ['index', '--data_base', checkpoints[1], '--photos', gallery, '--index', index],
                r"index '.*index' was built with another model .*: pass --rebuild")
    check_error(capsys, ['query', '--index', index, '--data_base', checkpoints[1], '--query_name', gallery],
                r"is not the model index '.*index' was built with")
    (tmp_path / 'note.txt').write_text('a sketch? no')
    check_error(capsys, ['query', '--index', index, '--query_name', tmp_path / 'note.txt', '--save_root', tmp_path / 'o'],
                r"cannot read image '.*note.txt'")
    check_error(capsys, ['query', '--index', tmp_path / 'mine', '--query_name', gallery], 'is not an index of search.py')
    check_error(capsys, ['query', '--index', index, '--query_name', tmp_path / 'nope.png'], 'query image not found')
    check_error(capsys, ['query', '--index', index, '--query_name', gallery, '--nprobe', 0],
                r'--nprobe must be from 1 to 2147483647, got 0')
    check_error(capsys, ['query', '--index', index, '--query_name', ''], '--query_name must not be empty')
    assert {p.name: p.read_bytes() for p in index.iterdir()} == before
    meta = build(checkpoints[1], gallery, index, '--rebuild')
    assert json.loads((index / 'meta.json').read_text())['model'] == meta['model']
