"""The standard-library byte corpus, the byte tokenizer and the synthetic data sets."""

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from jaxtrain.data import STDLIB_FILES, decode, encode, stdlib_corpus
from jaxtrain.data.registry import load
from jaxtrain.data.text import windows
from jaxtrain.errors import JaxtrainError


def test_byte_tokenizer_round_trips_utf8():
    text = "def f(x):\n    return 'é→λ'\n"
    tokens = encode(text)
    assert tokens.dtype == np.int32 and tokens.max() < 256
    assert len(tokens) == len(text.encode("utf-8"))
    assert decode(tokens) == text


def test_corpus_is_the_listed_files_split_per_file():
    root = Path(sysconfig.get_paths()["stdlib"])
    sizes = [(root / f).stat().st_size for f in STDLIB_FILES]
    train, valid = stdlib_corpus(valid_fraction=0.1)
    assert len(train) + len(valid) == sum(sizes)
    assert len(valid) == pytest.approx(0.1 * sum(sizes), rel=0.01)
    first = (root / STDLIB_FILES[0]).read_bytes()
    assert bytes(train[:100]) == first[:100]
    assert bytes(valid[: len(first) - int(len(first) * 0.9)]) == first[int(len(first) * 0.9):]


def test_text_data_set_windows_are_deterministic_and_chain():
    a, b = load("text", seq_len=64), load("text", seq_len=64)
    np.testing.assert_array_equal(a["valid"]["tokens"], b["valid"]["tokens"])
    tokens = a["train"]["tokens"]
    assert tokens.shape[1] == 65 and a["info"]["vocab_size"] == 256
    np.testing.assert_array_equal(tokens[:-1, -1], tokens[1:, 0])  # one shared byte
    assert a["info"]["train_bytes"] - 1 - tokens.shape[0] * 64 < 64


def test_text_refuses_bad_arguments():
    with pytest.raises(JaxtrainError, match="seq_len"):
        windows(np.arange(10, dtype=np.uint8), 0)
    with pytest.raises(JaxtrainError, match="longer than"):
        windows(np.arange(10, dtype=np.uint8), 20)
    with pytest.raises(JaxtrainError, match="valid_fraction"):
        stdlib_corpus(valid_fraction=1.5)
    with pytest.raises(JaxtrainError, match="missing"):
        stdlib_corpus(root="/nonexistent")
    with pytest.raises(JaxtrainError, match="unknown data set 'txt'"):
        load("txt")


def test_synthetic_regression_least_squares_recovers_the_teacher():
    d = load("synthetic_regression", n_train=2000, features=8, targets=2, noise=0.01, seed=1)
    x = np.concatenate([d["train"]["x"], np.ones((2000, 1), np.float32)], axis=1)
    coef = np.linalg.lstsq(x, d["train"]["y"], rcond=None)[0]
    np.testing.assert_allclose(coef[:-1], d["info"]["weights"], atol=5e-3)
    np.testing.assert_allclose(coef[-1], d["info"]["bias"], atol=5e-3)
    again = load("synthetic_regression", n_train=2000, features=8, targets=2, noise=0.01,
                 seed=1)
    np.testing.assert_array_equal(again["valid"]["y"], d["valid"]["y"])


def test_synthetic_classification_is_separable_by_class_means():
    d = load("synthetic_classification", n_train=2000, n_valid=500, features=8,
             num_classes=3, separation=6.0, seed=2)
    x, y = d["train"]["image"], d["train"]["label"]
    assert set(np.unique(y)) == {0, 1, 2} and x.shape == (2000, 8)
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    vx, vy = d["valid"]["image"], d["valid"]["label"]
    pred = np.argmin(((vx[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == vy).mean() > 0.9
    with pytest.raises(JaxtrainError, match="num_classes"):
        load("synthetic_classification", num_classes=1)
