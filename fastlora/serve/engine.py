"""``Server``: continuous-batching greedy generation, a different adapter per request.

Requests wait in a queue; each ``step()`` first decodes one token for every running request
(one forward over the batch, each row through its own adapter), then admits waiting
requests (as many as ``max_batch`` and the pool's slots allow, in arrival order), prefills
them together (left-padded) and emits their first token; finished requests leave, so
requests join and leave between decode steps. Tokens stream out as ``(request, token)``
pairs from ``step()`` / ``stream()`` and through each request's ``on_token`` callback.

Adapters live in an ``AdapterPool`` (registered from any format ``fastlora.io`` reads,
paged to the device on demand): ``load`` / ``unload`` / ``load(..., replace=True)`` work
between steps; the routing of each forward is made from the pool after its adapters are
reserved, so it never serves an adapter that was swapped out under it.

On CUDA, decode steps replay CUDA graphs, one per batch-size bucket, over a static KV
cache of ``max_length`` columns (``fastlora.serve.graphs``); prefills run eagerly. On the
CPU (or with ``cuda_graphs=False``) every step runs eagerly on transformers'
``DynamicCache`` (``fastlora.serve.kv``).

Nothing is lost: ``submit`` refuses what would fail later (token ids outside the vocabulary,
an empty prompt, ``max_new_tokens < 1``, an unknown adapter); a step whose forward raises
puts the server back as it was before that forward (see ``Server.step``) and re-raises; a
callback that raises fails its own request only, with the exception on ``Request.error``.
"""
from __future__ import annotations

import inspect
import itertools
import operator
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops.checks import check_positive_int
from ..adapters.routing import BASE
from .attach import attach, routed
from .graphs import GraphDecoder
from .kv import Running, cache_keyword
from .pool import AdapterPool
from .static_kv import StaticRunning, static_cache_unsupported

__all__ = ["Request", "Server"]

_IDS = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation request: ``prompt`` token ids, ``adapter`` (None: the base model),
    ``max_new_tokens``, ``stop`` token ids; ``tokens`` grows as tokens are generated and
    ``done`` is set when it finishes: a stop token, the length limit, ``cancel``, or a
    failure, whose exception is then ``error`` (its ``on_token`` callback raised, or its
    prefill raised with no other request in it)."""
    prompt: list[int]
    adapter: str | None
    max_new_tokens: int
    stop: frozenset[int]
    on_token: Callable[[Request, int], None] | None = None
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    error: Exception | None = None
    id: int = field(default_factory=lambda: next(_IDS))
    _alone: bool = field(default=False, repr=False)  # prefilled alone: a batch it was in failed

    def _ends_with(self, token: int) -> bool:
        """Whether ``token``, appended, finishes the request."""
        return token in self.stop or len(self.tokens) + 1 >= self.max_new_tokens

    def _commit(self, token: int) -> None:
        self.done = self.done or self._ends_with(token)
        self.tokens.append(token)

    def _fail(self, error: Exception) -> None:
        self.error, self.done = error, True


def _vocab_size(model: nn.Module) -> int:
    """The number of token ids the model's input embedding takes."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    size = getattr(embed, "num_embeddings", None)
    if size is None:
        size = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(size, int):
        raise TypeError(f"Server needs a causal LM whose token ids it can check: "
                        f"{type(model).__name__} has no get_input_embeddings() nor config.vocab_size")
    return size


class Server:
    """Greedy generation for a transformers causal LM (full-attention ``DynamicCache``
    layers) over an ``AdapterPool`` of the same model, whose linear layers are attached to
    the pool's bank (``fastlora.serve.attach``). ``max_batch`` (>= 1): the most requests
    decoded together; ``eos_token_id``: default stop tokens (default the model's generation
    config); ``pad_token_id``: the left padding of a prefill. Token ids are checked against
    the model's input embedding (``vocab``). Puts the model in eval mode.

    ``cuda_graphs``: decode steps replay CUDA graphs (``fastlora.serve.graphs``): one per
    batch-size bucket (1, 2, 4, 8, 16, 24, ... ``max_batch``; a step pads its rows to the
    smallest bucket holding them), captured at a bucket's first step after two eager
    warm-up runs, over a static KV cache of ``max_batch`` rows and ``max_length`` columns
    (allocated at the first prefill: 2 x layers x ``max_batch`` x KV heads x head dim x
    ``max_length`` elements), the bucket's static routing and the pool's bank.
    Before each step the graphs are checked against what they captured (the bank's storage
    and the layers its adapters cover, the model's parameters and buffers) and captured
    again when it changed (``graphs.invalidations`` counts why); a capture that fails turns
    graphs off with a warning (``graphs.disabled``) and the steps run eagerly. None (the
    default): on when the model is on CUDA and transformers' ``StaticCache`` holds it;
    ``why_eager`` says why they are off. Hooks and other Python in the model's forward do
    not run at replays. ``max_length``: the longest request (prompt + ``max_new_tokens``)
    ``submit`` accepts (None: any, or with graphs min(``max_position_embeddings``, 2048)).
    """

    def __init__(self, model: nn.Module, pool: AdapterPool, *, max_batch: int = 32,
                 eos_token_id: int | Iterable[int] | None = None, pad_token_id: int = 0,
                 cuda_graphs: bool | None = None, max_length: int | None = None):
        if pool.bank.model is not model:
            raise ValueError("the pool was made for another model")
        check_positive_int("max_batch", max_batch)
        if max_length is not None:
            check_positive_int("max_length", max_length)
        if cuda_graphs not in (None, True, False):
            raise TypeError(f"cuda_graphs must be True, False or None, got {cuda_graphs!r}")
        self.vocab = _vocab_size(model)
        self.pad = self._token_ids([pad_token_id], "pad_token_id")[0]
        if eos_token_id is None:
            eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos = frozenset(self._token_ids(
            [] if eos_token_id is None else
            [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id, "eos_token_id"))
        self.model, self.pool, self.max_batch = model.eval(), pool, max_batch
        attach(model, pool.bank)
        params = inspect.signature(type(model).forward).parameters
        self._cache_arg = cache_keyword(model)
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.why_eager = self._why_eager(cuda_graphs)
        self.graphs: GraphDecoder | None = None
        if self.why_eager is None:
            config = getattr(model, "config", None)
            max_length = max_length or min(
                getattr(config, "max_position_embeddings", None) or 2048, 2048)
            self.graphs = GraphDecoder(model, pool.bank, max_batch=max_batch,
                                       max_length=max_length, pad=self.pad,
                                       cache_arg=self._cache_arg, extra=self._extra)
        self.max_length = max_length
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._batch: Running | StaticRunning | None = None

    def _why_eager(self, cuda_graphs: bool | None) -> str | None:
        """Why decode steps run eagerly (None: they replay CUDA graphs); ``cuda_graphs=True``
        that cannot be honoured raises."""
        if cuda_graphs is False:
            return "cuda_graphs=False"
        device = self.pool.device
        why = (f"the model is on {device.type}, CUDA graphs need CUDA"
               if device.type not in GraphDecoder.devices else static_cache_unsupported(self.model))
        if why is not None and cuda_graphs:
            raise ValueError(f"cuda_graphs=True: {why}")
        return why

    # ------------------------------------------------------------ requests

    def submit(self, prompt, *, adapter: str | None = None, max_new_tokens: int = 32,
               stop: Iterable[int] | None = None,
               on_token: Callable[[Request, int], None] | None = None) -> Request:
        """Queue a request (``prompt``: token ids, a list or a 1-D integer tensor, each in
        ``[0, vocab)``); it joins the batch at a coming step. ``on_token(request, token)``
        runs after each step that made a token for it; if it raises, the request fails
        (``request.error``) and the others go on."""
        request = self._request(prompt, adapter, max_new_tokens, stop, on_token)
        self.waiting.append(request)
        return request

    def _request(self, prompt, adapter, max_new_tokens, stop, on_token) -> Request:
        """A checked request (queued nowhere)."""
        prompt = self._token_ids(prompt, "prompt")
        if not prompt:
            raise ValueError("prompt is empty: a request needs at least one prompt token")
        check_positive_int("max_new_tokens", max_new_tokens)
        if self.max_length is not None and len(prompt) + max_new_tokens > self.max_length:
            graphs = " (the static KV cache of its CUDA graphs)" if self.graphs else ""
            raise ValueError(f"a prompt of {len(prompt)} tokens and max_new_tokens="
                             f"{max_new_tokens} exceed the server's max_length="
                             f"{self.max_length}{graphs}: pass Server(max_length=...)")
        if adapter == BASE:
            adapter = None
        if adapter is not None and not isinstance(adapter, str):
            raise TypeError(f"adapter must be a registered adapter's name or None, got "
                            f"{type(adapter).__name__}")
        if adapter is not None and adapter not in self.pool:
            raise KeyError(f"unknown adapter {adapter!r}: load it first")
        if on_token is not None and not callable(on_token):
            raise TypeError(f"on_token must be callable, got {type(on_token).__name__}")
        stop = self.eos if stop is None else frozenset(self._token_ids(stop, "stop"))
        return Request(prompt, adapter, max_new_tokens, stop, on_token)

    def _token_ids(self, ids, what: str) -> list[int]:
        """``ids`` (an iterable of integers or a 1-D integer tensor) as a list, each checked
        to be in ``[0, vocab)``."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or ids.dtype == torch.bool or ids.is_floating_point() \
                    or ids.is_complex():
                raise TypeError(f"{what} must be token ids: a list of ints or a 1-D integer "
                                f"tensor, got a {ids.dtype} tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"{what} must be token ids, not text: tokenize it first")
        try:
            items = iter(ids)
        except TypeError:
            raise TypeError(f"{what} must be token ids (a list of ints or a 1-D integer tensor), "
                            f"got {type(ids).__name__}") from None
        ids = []
        for t in items:
            try:
                ids.append(operator.index(t) if not isinstance(t, bool) else None)
            except TypeError:
                ids.append(None)
            if ids[-1] is None:
                raise TypeError(f"{what} must hold integer token ids, got {t!r} "
                                f"({type(t).__name__})")
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise ValueError(f"{what} holds token id {bad[0]}, outside the model's vocabulary "
                             f"[0, {self.vocab})")
        return ids

    def cancel(self, request: Request) -> None:
        """Stop a request; it leaves the batch at the next step."""
        request.done = True

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # ------------------------------------------------------------ adapters

    def load(self, name: str, source, *, replace: bool = False) -> None:
        """Register an adapter (hot: between steps); ``replace`` swaps a registered one, which
        running requests then use from their next token on."""
        self.pool.register(name, source, replace=replace)

    def unload(self, name: str) -> None:
        """Forget an adapter no queued or running request uses."""
        users = [r.id for r in [*self.waiting, *self.running] if r.adapter == name and not r.done]
        if users:
            raise RuntimeError(f"adapter {name!r} is in use by request(s) {users}")
        self.pool.unregister(name)

    # ------------------------------------------------------------ the loop

    @torch.no_grad()
    def step(self) -> list[tuple[Request, int]]:
        """Decode one token for the running requests, then admit and prefill waiting ones;
        returns the ``(request, token)`` pairs emitted, in order, after their ``on_token``
        callbacks ran (each isolated: one that raises fails its request only).

        A forward that raises leaves the server as it was before it, and the exception
        propagates: after a failed decode the running requests keep their state (the cache
        drops what the forward appended); after a failed prefill its requests go back to the
        front of ``waiting``, in order, to be prefilled one at a time, except a request that
        was prefilled alone: that one failed (``done``, with the exception on ``error``).
        Tokens a decode made before a prefill failed stay, and their callbacks ran."""
        emitted: list[tuple[Request, int]] = []
        self._drop_finished()
        try:
            if self.running:
                emitted += self._decode()
            emitted += self._admit_and_prefill()
        finally:
            self._notify(emitted)
            self._drop_finished()
        return emitted

    def stream(self) -> Iterator[tuple[Request, int]]:
        """Step until every request is done, yielding tokens as they come (requests may be
        submitted meanwhile)."""
        while not self.idle:
            yield from self.step()

    def generate(self, prompts, adapters, max_new_tokens: int = 32) -> list[list[int]]:
        """Submit ``prompts`` with their ``adapters`` and run them all: generated tokens per
        prompt. If it raises, none of its requests is left queued or running."""
        requests = [self._request(p, a, max_new_tokens, None, None)
                    for p, a in zip(prompts, adapters, strict=True)]
        self.waiting.extend(requests)
        try:
            for _ in self.stream():
                pass
        except BaseException:
            mine = set(requests)
            for r in requests:
                r.done = True
            self.waiting = deque(r for r in self.waiting if r not in mine)
            self._drop_finished()
            raise
        return [r.tokens for r in requests]

    # ------------------------------------------------------------ steps

    def _forward(self, requests: list[Request], ids, mask, positions, cache):
        routing = self.pool.route(r.adapter for r in requests)
        with routed(routing):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             use_cache=True, **{self._cache_arg: cache}, **self._extra)
        return out.logits[:, -1].argmax(-1).tolist()

    def _decode(self) -> list[tuple[Request, int]]:
        batch = self._batch
        self.pool.reserve(r.adapter for r in self.running)
        last = [r.tokens[-1] for r in self.running]
        try:
            if self.graphs is not None:
                tokens = self.graphs.decode(batch, last, [r.adapter for r in self.running])
            else:
                ids = torch.tensor(last, device=self.pool.device)[:, None]
                mask = batch.mask_for_step()
                tokens = self._forward(self.running, ids, mask, batch.positions(), batch.cache)
                batch.stepped(mask)
        except BaseException:
            batch.rollback()
            raise
        for r, t in zip(self.running, tokens):
            r._commit(t)
        return list(zip(self.running, tokens))

    def _admit_and_prefill(self) -> list[tuple[Request, int]]:
        """Admit waiting requests and prefill them; if that raises, they go back to the front
        of ``waiting`` (to be prefilled one at a time), or, admitted alone, fail."""
        admitted = self._admit()
        if not admitted:
            return []
        try:
            self.pool.reserve([r.adapter for r in self.running + admitted])
            return self._prefill(admitted)
        except BaseException as error:
            if isinstance(error, Exception) and len(admitted) == 1:
                admitted[0]._fail(error)
            else:
                for r in admitted:
                    r._alone = r._alone or isinstance(error, Exception)
                self.waiting.extendleft(reversed(admitted))
            raise

    def _admit(self) -> list[Request]:
        """Waiting requests (taken from the queue in order) that fit the batch and, with the
        running ones' adapters, the pool's slots; a request marked to be prefilled alone
        comes alone."""
        admitted: list[Request] = []
        adapters = {r.adapter for r in self.running} - {None}
        while self.waiting and len(self.running) + len(admitted) < self.max_batch:
            head = self.waiting[0]
            if head.done:
                self.waiting.popleft()
                continue
            wanted = adapters | ({head.adapter} - {None})
            if len(wanted) > self.pool.slots or (admitted and (head._alone or admitted[0]._alone)):
                break
            adapters = wanted
            admitted.append(self.waiting.popleft())
        return admitted

    def _prefill(self, requests: list[Request]) -> list[tuple[Request, int]]:
        """One forward over ``requests`` (left-padded), then, once nothing can fail any more,
        their first tokens and their rows' join to the running batch."""
        from transformers import DynamicCache

        device, width = self.pool.device, max(len(r.prompt) for r in requests)
        ids = torch.tensor([[self.pad] * (width - len(r.prompt)) + r.prompt for r in requests],
                           device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt)
                             for r in requests], device=device)
        positions = (mask.cumsum(1) - 1).clamp_(min=0)
        cache = DynamicCache(config=getattr(self.model, "config", None))
        tokens = self._forward(requests, ids, mask, positions, cache)
        joined = Running(cache, mask, [len(r.prompt) for r in requests])
        live = [i for i, (r, t) in enumerate(zip(requests, tokens))
                if not (r.done or r._ends_with(t))]
        if live:
            if len(live) < len(requests):
                joined.keep(live)
            if self._batch is None:
                self._batch = joined if self.graphs is None else self.graphs.start(joined)
            else:
                self._batch.merge(joined)
        for r, t in zip(requests, tokens):  # committed: nothing below raises
            r._commit(t)
        self.running += [requests[i] for i in live]
        return list(zip(requests, tokens))

    def _notify(self, emitted: list[tuple[Request, int]]) -> None:
        """Each emitted token's ``on_token`` callback; one that raises fails its request."""
        for r, t in emitted:
            if r.on_token is not None and r.error is None:
                try:
                    r.on_token(r, t)
                except Exception as error:
                    r._fail(error)

    def _drop_finished(self) -> None:
        live = [i for i, r in enumerate(self.running) if not r.done]
        if len(live) == len(self.running):
            return
        self.running = [self.running[i] for i in live]
        if live:
            self._batch.keep(live)
        else:
            self._batch = None
