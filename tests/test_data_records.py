"""`jaxtrain data prepare` and the Grain reader: prepared data equals its source (raw
bytes, Hugging Face's own encoding, Pillow-independent pixel values, the input arrays),
reruns are no-ops, an unfinished preparation is never taken for a finished one, and the
loader's batches are a pure function of (seed, step) split over hosts."""

import json
import threading

import numpy as np
import pytest
from tokenizers import Tokenizer

from jaxtrain.data.prepare import prepare_arrays, prepare_images, prepare_text
from jaxtrain.data.records import Loader, load_records, read_manifest
from jaxtrain.errors import JaxtrainError

TEXTS = {
    "a.txt": "def hello(name):\n    return 'hello ' + name\n" * 40,
    "b.txt": "import os\nprint(os.getcwd())  # où suis-je?\n" * 30,
    "sub/c.txt": "class A:\n    pass\n\n\nclass B(A):\n    x = 1\n" * 25,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for name, text in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _stream(folder, split):
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = manifest["splits"][split]["shards"]["tokens"]
    return np.concatenate([np.load(folder / s["file"]) for s in shards]), manifest


def test_bytes_are_the_files_bytes_split_per_file(corpus, tmp_path):
    out = tmp_path / "bytes"
    prepare_text([corpus], out, valid_fraction=0.2, shard_mb=0.001, progress=False)
    train, manifest = _stream(out, "train")
    valid, _ = _stream(out, "valid")
    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    raw = [f.read_bytes() for f in files]
    cuts = [int(len(r) * 0.8) for r in raw]
    assert train.tobytes() == b"".join(r[:c] for r, c in zip(raw, cuts, strict=True))
    assert valid.tobytes() == b"".join(r[c:] for r, c in zip(raw, cuts, strict=True))
    assert len(manifest["splits"]["train"]["shards"]["tokens"]) > 1  # 1 KB shards
    starts = np.load(out / "train/documents.npy")
    assert list(np.diff(starts)) == cuts
    assert manifest["tokenizer"]["kind"] == "bytes" and train.dtype == np.uint8


def test_bpe_tokens_are_the_tokenizers_own_encoding(corpus, tmp_path):
    out = tmp_path / "bpe"
    prepare_text([corpus / "*.txt"], out, tokenizer="bpe", vocab_size=300,
                 valid_fraction=0.0, progress=False)
    train, manifest = _stream(out, "train")
    reference = Tokenizer.from_file(str(out / "tokenizer.json"))  # Hugging Face's own
    eos = reference.token_to_id("<|endoftext|>")
    expected = []
    for name in ("a.txt", "b.txt"):  # the glob matches the top level only, sorted
        expected += reference.encode(TEXTS[name], add_special_tokens=False).ids + [eos]
    np.testing.assert_array_equal(train, expected)
    assert reference.decode(train[:-1].tolist()).startswith(TEXTS["a.txt"])
    assert manifest["tokenizer"]["vocab_size"] == reference.get_vocab_size() <= 300
    # a given tokenizer file gives the same tokens
    again = prepare_text([corpus / "*.txt"], tmp_path / "given",
                         tokenizer=str(out / "tokenizer.json"), valid_fraction=0.0,
                         progress=False)
    np.testing.assert_array_equal(_stream(tmp_path / "given", "train")[0], train)
    assert again["tokenizer"]["digest"] == manifest["tokenizer"]["digest"]


def test_rerun_is_a_noop_and_a_change_prepares_again(corpus, tmp_path, capsys):
    out = tmp_path / "p"
    first = prepare_text([corpus], out, progress=False)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert prepare_text([corpus], out, progress=True) == first
    assert "up to date" in capsys.readouterr().err
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    (corpus / "extra.txt").write_text("more text\n")
    try:
        second = prepare_text([corpus], out, progress=False)
    finally:
        (corpus / "extra.txt").unlink()
    assert second["source"]["files"] == first["source"]["files"] + 1
    assert not list(tmp_path.glob(".p.*"))  # no partial or old folder left


def test_an_interrupted_preparation_leaves_nothing_that_reads_as_done(corpus, tmp_path,
                                                                      monkeypatch):
    from jaxtrain.data import prepare

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare.Shards, "close", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_text([corpus], tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())
    # a folder left by a killed process (it cannot clean up) is named in the error
    (tmp_path / ".y.partial-999999").mkdir()
    with pytest.raises(JaxtrainError, match="did not finish"):
        read_manifest(tmp_path / "y")


def test_windows_cross_shards_and_documents_as_asked(corpus, tmp_path):
    out = tmp_path / "w"
    prepare_text([corpus], out, valid_fraction=0.0, shard_mb=0.0005, progress=False)
    stream, _ = _stream(out, "train")
    seq = 50
    data = load_records(str(out), seq_len=seq)
    windows = data["train"].source
    n = (len(stream) - 1) // seq
    assert len(windows) == n
    for i in (0, 7, n - 1):
        np.testing.assert_array_equal(windows[i]["tokens"], stream[i * seq:i * seq + seq + 1])
    np.testing.assert_array_equal(windows.rows(3, 9)["tokens"],
                                  np.stack([windows[i]["tokens"] for i in range(3, 9)]))
    inside = load_records(str(out), seq_len=seq, cross_documents=False)["train"].source
    starts = np.load(out / "train/documents.npy")
    assert len(inside) == sum((np.diff(starts) - 1) // seq)
    for i in range(len(inside)):
        start = inside._start(i)
        doc = np.searchsorted(starts, start, "right") - 1
        assert start + seq + 1 <= starts[doc + 1]  # never past the document's end
        np.testing.assert_array_equal(inside[i]["tokens"], stream[start:start + seq + 1])


def test_loader_batches_are_a_function_of_the_step_split_over_hosts(corpus, tmp_path):
    out = tmp_path / "l"
    prepare_text([corpus], out, valid_fraction=0.0, progress=False)
    records = load_records(str(out), seq_len=16)["train"]
    n, batch = len(records), 8
    one = Loader(records.source, batch, seed=3, process_index=0, process_count=1)
    steps = 2 * n // batch + 1
    seq = [one(s)["tokens"] for s in range(steps)]
    # random access (a resumed run) gives the same batches as the sequential run
    np.testing.assert_array_equal(one(5)["tokens"], seq[5])
    np.testing.assert_array_equal(one(2)["tokens"], seq[2])
    # two hosts: disjoint halves of the same global batch
    hosts = [Loader(records.source, batch, seed=3, process_index=h, process_count=2)
             for h in range(2)]
    for s in (0, 1, 9):
        np.testing.assert_array_equal(np.concatenate([h(s)["tokens"] for h in hosts]), seq[s])
    # each epoch sees every window once, in a new order
    flat = np.concatenate(seq)
    key = lambda rows: sorted(map(bytes, rows.astype(np.int32)))
    everything = key(records.source.rows(0, n)["tokens"])
    assert key(flat[:n]) == everything and key(flat[n:2 * n]) == everything
    assert not np.array_equal(flat[:n], flat[n:2 * n])
    other = Loader(records.source, batch, seed=4, process_index=0, process_count=1)
    assert not np.array_equal(other(0)["tokens"], seq[0])
    # several batches in one read (steps_per_call) are the batches one by one, also
    # across an epoch's end
    for loader in (one, *hosts):
        first = n // batch - 1
        want = np.stack([loader(s)["tokens"] for s in range(first, first + 3)])
        np.testing.assert_array_equal(loader.many(first, 3)["tokens"], want)


@pytest.mark.slow  # two worker processes start (import Grain, NumPy): ~10-40 s here
def test_worker_processes_give_the_same_batches(corpus, tmp_path):
    out = tmp_path / "mp"
    prepare_text([corpus], out, valid_fraction=0.0, progress=False)
    records = load_records(str(out), seq_len=16)["train"]
    plain = Loader(records.source, 8, seed=0, process_index=0, process_count=1)
    workers = Loader(records.source, 8, seed=0, workers=2, process_index=0, process_count=1)
    for s in range(6):
        np.testing.assert_array_equal(workers(s)["tokens"], plain(s)["tokens"])
        iterator = workers.iterator
    np.testing.assert_array_equal(workers(6)["tokens"], plain(6)["tokens"])
    assert workers.iterator is iterator  # continued, not started anew
    np.testing.assert_array_equal(workers(2)["tokens"], plain(2)["tokens"])  # a resume
    assert workers.iterator is not iterator  # restarts the pipeline
    workers.close()
    assert workers.iterator is None


def test_reading_without_workers_starts_no_read_thread(corpus, tmp_path):
    # each batch is read when asked, in the caller's thread: Grain's read threads only
    # added Python per step beside the training step (the shuffle's next block is
    # computed ahead in one thread of its own)
    out = tmp_path / "nt"
    prepare_text([corpus], out, valid_fraction=0.0, progress=False)
    records = load_records(str(out), seq_len=16)["train"]
    before = set(threading.enumerate())
    loader = records.loader(8, 0, process_index=0, process_count=1)
    for s in (0, 1, 2, 7, 3):
        loader(s)
    started = [t.name for t in threading.enumerate() if t not in before]
    assert [name.split("_")[0] for name in started] == ["shuffle-ahead"]


def test_image_folder_gives_the_pixels_and_skips_undecodable_files(tmp_path, capsys):
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path / "img"
    pixels = np.round(digits.images[:60] * 255 / 16).astype(np.uint8)
    for i, (image, label) in enumerate(zip(pixels, digits.target[:60], strict=True)):
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(root / f"c{label}" / f"{i:03d}.png")
    (root / "c0" / "broken.png").write_bytes(b"\x89PNG not really")
    manifest = prepare_images(root, tmp_path / "out", valid_fraction=0.25, progress=True)
    assert "skipped 1 image" in capsys.readouterr().err
    assert manifest["skipped"] == {"count": 1, "files": ["c0/broken.png"]}
    assert manifest["classes"] == [f"c{d}" for d in range(10)]
    data = load_records(str(tmp_path / "out"))
    train, valid = data["train"].source.rows(0, len(data["train"])), data["valid"]
    images = np.concatenate([train["image"], valid["image"][:]])
    labels = np.concatenate([train["label"], valid["label"][:]])
    assert len(images) == 60 and len(valid["label"]) in (14, 15)  # 15 of 61 files held out
    assert data["info"]["num_classes"] == 10
    # every digit is there with its label and its pixel values (scaled to [0, 1])
    assert images.dtype == np.float32 and images.max() <= 1.0
    expected = {(int(lab), img.tobytes())
                for img, lab in zip(pixels, digits.target[:60], strict=True)}
    back = np.round(images[..., 0] * 255).astype(np.uint8)
    got = {(int(lab), img.tobytes()) for img, lab in zip(back, labels, strict=True)}
    assert got == expected
    resized = prepare_images(root, tmp_path / "big", image_size=[12, 10], progress=False)
    assert resized["features"]["image"]["shape"] == [12, 10, 1]


def test_arrays_keep_every_row_once(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(101, 3, 2)).astype(np.float32), rng.integers(0, 4, 101)
    np.savez(tmp_path / "d.npz", x=x, label=y.astype(np.int32))
    prepare_arrays(tmp_path / "d.npz", tmp_path / "out", valid_fraction=0.2, shard_mb=0.0002,
                   progress=False)
    data = load_records(str(tmp_path / "out"))
    train = data["train"].source.rows(0, len(data["train"]))
    rows = np.concatenate([train["x"], data["valid"]["x"][:]])
    assert len(data["valid"]["x"]) == 20 and data["info"]["num_classes"] == int(y.max()) + 1
    order = np.argsort(rows[:, 0, 0])
    np.testing.assert_array_equal(rows[order], x[np.argsort(x[:, 0, 0])])
    # a batch is read in one go across shards; the batches are Grain's own, per example
    import grain

    source = data["train"].source
    for hosts in (1, 2):
        for h in range(hosts):
            grains = grain.MapDataset.source(source).shuffle(seed=7).repeat().batch(
                10 // hosts, drop_remainder=True)[h::hosts]
            loader = Loader(source, 10, seed=7, process_index=h, process_count=hosts)
            for s in (0, 1, 7, 8, 9, 30):  # 8 and 9 straddle the first epoch's end
                got, want = loader(s), grains[s]
                for k in want:
                    assert got[k].dtype == want[k].dtype
                    np.testing.assert_array_equal(got[k], want[k])
