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


def count_launches(monkeypatch) -> list[str]:
    """The Triton kernels launched from now on, by name, in order: one entry per launch
    (an autotuned kernel's benchmark runs while tuning count as one), compiled or in the
    interpreter."""
    import triton.runtime.autotuner as autotuner
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    launched: list[str] = []
    depth = [0]

    def wrap(cls):
        original = cls.run

        def run(self, *args, **kwargs):
            if depth[0] == 0:
                launched.append(self.fn.__name__ if cls is autotuner.Autotuner else self.__name__)
            depth[0] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
        monkeypatch.setattr(cls, "run", run)

    for cls in (autotuner.Autotuner, jit.JITFunction, interpreter.InterpretedFunction):
        wrap(cls)
    return launched


def torch_ops():
    """A ``TorchDispatchMode`` that records the name of every torch op run under it (``.ops``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class TorchOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func.name())
            return func(*args, **(kwargs or {}))

    return TorchOps()
