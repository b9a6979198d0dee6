"""Counting calls: ``count_calls(monkeypatch, (module, "name"), ...)`` wraps each function
so that a test can assert how often it ran (the dict it returns counts by name)."""


def count_calls(monkeypatch, *targets) -> dict[str, int]:
    counts = {name: 0 for _, name in targets}
    for module, name in targets:
        original = getattr(module, name)

        def counted(*args, _f=original, _n=name, **kwargs):
            counts[_n] += 1
            return _f(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return counts
