"""Multi-tenant serving on one machine: a different LoRA / DoRA adapter per request.

* ``attach(model, bank)`` / ``detach(model)``: a plain model's linear layers take each row's
  adapter from an ``AdapterBank`` (class swap, no patched forwards), following the routing
  that ``routed(routing)`` makes current;
* ``AdapterPool``: adapters registered from any format ``fastlora.io`` reads, kept in CPU
  memory and paged into a bounded set of device slots on demand (least recently used out);
* ``Server``: continuous-batching greedy generation on transformers' ``DynamicCache``,
  requests joining and leaving between decode steps, tokens streamed out, adapters loaded,
  replaced and unloaded while serving; on CUDA its decode steps replay CUDA graphs per
  batch-size bucket over a static KV cache (``fastlora.serve.graphs``).

Needs transformers for ``Server``. Where serving outgrows one machine, an engine such as vLLM
is the place (see the README on how fastlora's kernels map onto its LoRA layers).
"""
from .attach import attach, detach, is_attached, routed
from .engine import Request, Server
from .pool import AdapterPool

__all__ = ["AdapterPool", "Request", "Server", "attach", "detach", "is_attached", "routed"]
