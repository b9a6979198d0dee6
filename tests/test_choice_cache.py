"""The on-disk choice cache (fastlora.choice.store): every unreadable file is ignored with
one warning and rewritten by the next write, and concurrent writers lose no entries (a
file lock around read-merge-replace; none where fcntl is missing)."""
import json
import threading
import time
import warnings

import pytest

from fastlora.choice import store as choice_cache
from fastlora.choice.store import Choice, ChoiceCache


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLORA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def written(path) -> dict:
    return json.loads(path.read_text())["choices"]


@pytest.mark.parametrize("content", [
    b"\xff\xfe not utf-8 \x80",  # UnicodeDecodeError
    b"[" * 100_000 + b"]" * 100_000,  # nested past the recursion limit: RecursionError
    b'{"format": 1, "choices": []}',
    b'{"format": 1, "choices": {"k": "cublas"}}',
    b'{"format": 1, "choices": {"k": {"impl": "cublas", "timings_ms": [1, 2]}}}',
    b'{"format": 1, "choices": {"k": {"impl": "cublas", "timings_ms": {"a": "fast"}}}}',
    b'{"format": 1, "choices": {"k": {"impl": "cublas", "timings_ms": {"a": 1e999999}}}}',
    b'{"format": 1, "choices": {"k": {"impl": "cublas", "timings_ms": {"a": ' + b"9" * 400 + b"}}}}",
    b'{"format": 1, "choices": {"k": {"impl": "cublas", "unavailable": {"tma": 3}}}}',
    b'"just a string"',
])
def test_unreadable_files_warn_once_and_are_rewritten(content):
    cache = ChoiceCache()
    path = cache.path("cpu")
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache.get("cpu", "k") is None
        cache.put("cpu", "k2", Choice("fused", {"fused": 1.0}))
    assert len(caught) == 1 and "unreadable choice cache" in str(caught[0].message), \
        [str(w.message) for w in caught]
    assert written(path) == {"k2": {"impl": "fused", "timings_ms": {"fused": 1.0},
                                    "unavailable": {}}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ChoiceCache().get("cpu", "k2") == Choice("fused", {"fused": 1.0})


def slow_reads(monkeypatch):
    """Each read of a cache file takes a while: concurrent read-merge-replace cycles overlap
    unless something serializes them."""
    read = ChoiceCache._read

    def slow(self, path):
        out = read(self, path)
        time.sleep(0.01)
        return out

    monkeypatch.setattr(ChoiceCache, "_read", slow)


def write_concurrently(writers: int, keys: int) -> None:
    """``writers`` threads, each with its own cache (as separate processes have), write
    ``keys`` different keys each."""
    start = threading.Barrier(writers)

    def writer(w):
        cache = ChoiceCache()
        start.wait()
        for i in range(keys):
            cache.put("cpu", f"w{w}-k{i}", Choice("fused", {"fused": float(i)}))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_concurrent_writers_lose_no_entries(monkeypatch):
    slow_reads(monkeypatch)
    write_concurrently(writers=3, keys=8)
    path = ChoiceCache().path("cpu")
    assert sorted(written(path)) == sorted(f"w{w}-k{i}" for w in range(3) for i in range(8))
    assert path.with_name(path.name + ".lock").exists()
    assert not list(path.parent.glob("*.tmp"))


def test_without_fcntl_writes_still_work(monkeypatch):
    """Where fcntl is missing (Windows) the cache writes without a lock."""
    monkeypatch.setattr(choice_cache, "fcntl", None)
    cache = ChoiceCache()
    cache.put("cpu", "k", Choice("cublas"))
    path = cache.path("cpu")
    assert written(path) == {"k": {"impl": "cublas", "timings_ms": {}, "unavailable": {}}}
    assert not path.with_name(path.name + ".lock").exists()
