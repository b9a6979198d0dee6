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
"""
from __future__ import annotations

import inspect
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..routing import BASE
from .attach import attach, routed
from .kv import Running, cache_keyword
from .pool import AdapterPool

__all__ = ["Request", "Server"]

_IDS = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation request: ``prompt`` token ids, ``adapter`` (None: the base model),
    ``max_new_tokens``, ``stop`` token ids; ``tokens`` grows as tokens are generated and
    ``done`` is set when it finishes (a stop token, the length limit, or ``cancel``)."""
    prompt: list[int]
    adapter: str | None
    max_new_tokens: int
    stop: frozenset[int]
    on_token: Callable[[Request, int], None] | None = None
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    id: int = field(default_factory=lambda: next(_IDS))

    def _emit(self, token: int) -> None:
        self.tokens.append(token)
        if token in self.stop or len(self.tokens) >= self.max_new_tokens:
            self.done = True
        if self.on_token is not None:
            self.on_token(self, token)


class Server:
    """Greedy generation for a transformers causal LM (full-attention ``DynamicCache``
    layers) over an ``AdapterPool`` of the same model, whose linear layers are attached to
    the pool's bank (``fastlora.serve.attach``). ``max_batch``: the most requests decoded
    together; ``eos_token_id``: default stop tokens (default the model's generation
    config). Puts the model in eval mode."""

    def __init__(self, model: nn.Module, pool: AdapterPool, *, max_batch: int = 32,
                 eos_token_id: int | Iterable[int] | None = None, pad_token_id: int = 0):
        if pool.bank.model is not model:
            raise ValueError("the pool was made for another model")
        self.model, self.pool, self.max_batch, self.pad = model.eval(), pool, max_batch, pad_token_id
        if eos_token_id is None:
            eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos = frozenset([eos_token_id] if isinstance(eos_token_id, int)
                             else eos_token_id or ())
        attach(model, pool.bank)
        params = inspect.signature(type(model).forward).parameters
        self._cache_arg = cache_keyword(model)
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._batch: Running | None = None

    # ------------------------------------------------------------ requests

    def submit(self, prompt, *, adapter: str | None = None, max_new_tokens: int = 32,
               stop: Iterable[int] | None = None,
               on_token: Callable[[Request, int], None] | None = None) -> Request:
        """Queue a request (``prompt``: token ids); it joins the batch at a coming step."""
        prompt = [int(t) for t in (prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        if not prompt:
            raise ValueError("a request needs at least one prompt token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if adapter == BASE:
            adapter = None
        if adapter is not None and adapter not in self.pool:
            raise KeyError(f"unknown adapter {adapter!r}: load it first")
        request = Request(prompt, adapter, max_new_tokens,
                          self.eos if stop is None else frozenset(stop), on_token)
        self.waiting.append(request)
        return request

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
        returns the ``(request, token)`` pairs emitted, in order."""
        emitted: list[tuple[Request, int]] = []
        self._drop_finished()
        if self.running:
            self.pool.reserve(r.adapter for r in self.running)
            emitted += self._decode()
        admitted = self._admit()
        if admitted:
            emitted += self._prefill(admitted)
        self._drop_finished()
        return emitted

    def stream(self) -> Iterator[tuple[Request, int]]:
        """Step until every request is done, yielding tokens as they come (requests may be
        submitted meanwhile)."""
        while not self.idle:
            yield from self.step()

    def generate(self, prompts, adapters, max_new_tokens: int = 32) -> list[list[int]]:
        """Submit ``prompts`` with their ``adapters`` and run them all: generated tokens per
        prompt."""
        requests = [self.submit(p, adapter=a, max_new_tokens=max_new_tokens)
                    for p, a in zip(prompts, adapters, strict=True)]
        for _ in self.stream():
            pass
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
        ids = torch.tensor([[r.tokens[-1]] for r in self.running], device=self.pool.device)
        mask = batch.mask_for_step()
        tokens = self._forward(self.running, ids, mask, batch.positions(), batch.cache)
        batch.stepped(mask)
        for r, t in zip(self.running, tokens):
            r._emit(t)
        return list(zip(self.running, tokens))

    def _admit(self) -> list[Request]:
        """Waiting requests (in order) that fit the batch and, with the running ones'
        adapters, the pool's slots; their adapters are made resident."""
        admitted: list[Request] = []
        adapters = {r.adapter for r in self.running} - {None}
        while self.waiting and len(self.running) + len(admitted) < self.max_batch:
            head = self.waiting[0]
            if head.done:
                self.waiting.popleft()
                continue
            wanted = adapters | ({head.adapter} - {None})
            if len(wanted) > self.pool.slots:
                break
            adapters = wanted
            admitted.append(self.waiting.popleft())
        if admitted:
            self.pool.reserve([*adapters])
        return admitted

    def _prefill(self, requests: list[Request]) -> list[tuple[Request, int]]:
        from transformers import DynamicCache

        device, width = self.pool.device, max(len(r.prompt) for r in requests)
        ids = torch.tensor([[self.pad] * (width - len(r.prompt)) + r.prompt for r in requests],
                           device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt)
                             for r in requests], device=device)
        positions = (mask.cumsum(1) - 1).clamp_(min=0)
        cache = DynamicCache(config=getattr(self.model, "config", None))
        tokens = self._forward(requests, ids, mask, positions, cache)
        for r, t in zip(requests, tokens):
            r._emit(t)
        joined = Running(cache, mask, [len(r.prompt) for r in requests])
        live = [i for i, r in enumerate(requests) if not r.done]
        if live:
            if len(live) < len(requests):
                joined.keep(live)
            if self._batch is None:
                self._batch = joined
            else:
                self._batch.merge(joined)
            self.running += [requests[i] for i in live]
        return list(zip(requests, tokens))

    def _drop_finished(self) -> None:
        live = [i for i, r in enumerate(self.running) if not r.done]
        if len(live) == len(self.running):
            return
        self.running = [self.running[i] for i in live]
        if live:
            self._batch.keep(live)
        else:
            self._batch = None

