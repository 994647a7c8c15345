"""Replay a function of a list of CUDA tensors as CUDA graphs, one graph per input signature.

Why: a 6-block DyHead tower makes about 1,500 small kernel launches per call (5 levels x ~50 ops per
block); at batch 1 on an H100 the GPU waits on Python and the launch queue most of the time. A CUDA graph
replays all of them with one launch. ``GraphCache`` captures ``fn`` for an input signature (shapes, strides,
dtypes, device, autocast state, inference mode) the ``capture_after``-th time it sees that signature, copies
each call's inputs into the graph's static inputs, replays, and returns clones of the static outputs (the
next replay overwrites them). It keeps the first ``max_graphs`` graphs and never evicts: a stream of more
shapes than that (``dyhead eval`` on images of many sizes) runs the rest eagerly instead of capturing again
and again (a capture costs about three eager calls).

What ``fn`` must be: free of host synchronisation and of data-dependent shapes, reading parameters by
address (a module whose parameters are replaced, by ``.to()`` or ``.half()``, must ``clear()`` the cache;
``load_state_dict`` and optimisers write in place and need not). Autocast's weight-cast cache is turned off
while warming up and capturing (a cached cast made outside the graph would be freed under it, as PyTorch's
``make_graphed_callables`` warns). A capture that raises turns the cache off for good and ``fn`` runs eager:
correctness first.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor

Tensors = list[Tensor]


def _autocast_without_cache(device: str) -> torch.autocast:
    """The current autocast state of ``device`` with the weight-cast cache off."""
    return torch.autocast(
        device,
        dtype=torch.get_autocast_dtype(device),
        enabled=torch.is_autocast_enabled(device),
        cache_enabled=False,
    )


class GraphCache:
    """``fn(list of CUDA tensors) -> list of tensors`` replayed from CUDA graphs (see the module docstring).

    The cache holds no reference to ``fn`` (a module's bound method would keep a copied module calling the
    original): each call passes it."""

    def __init__(self, max_graphs: int = 4, capture_after: int = 2, warmup: int = 1):
        self.max_graphs = max_graphs
        self.capture_after = capture_after
        self.warmup = warmup
        self.graphs: dict[tuple, tuple[Tensors, torch.cuda.CUDAGraph, Tensors]] = {}
        self.seen: Counter[tuple] = Counter()
        self.disabled = False
        self.replays = 0  # calls answered from a graph (tests and benchmarks read it)

    def __deepcopy__(self, memo: dict) -> GraphCache:
        """A copied module gets an empty cache (graphs read the original's parameters by address)."""
        return GraphCache(self.max_graphs, self.capture_after, self.warmup)

    def __getstate__(self) -> dict:
        return {"max_graphs": self.max_graphs, "capture_after": self.capture_after, "warmup": self.warmup}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def clear(self) -> None:
        """Drop every graph (their memory goes back to PyTorch's allocator) and the signature counts."""
        self.graphs.clear()
        self.seen.clear()

    @staticmethod
    def signature(inputs: Tensors) -> tuple:
        device = inputs[0].device.type
        return (
            tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in inputs),
            torch.is_autocast_enabled(device),
            torch.get_autocast_dtype(device),
            torch.is_inference_mode_enabled(),
        )

    def __call__(self, fn: Callable[[Tensors], Tensors], inputs: Tensors) -> Tensors:
        """``fn(inputs)``, from a graph when this signature has one (``fn`` must be the same computation on
        every call with this cache: the graph replays what it captured)."""
        if self.disabled:
            return fn(inputs)
        key = self.signature(inputs)
        entry = self.graphs.get(key)
        if entry is None:
            self.seen[key] += 1
            if self.seen[key] < self.capture_after or len(self.graphs) >= self.max_graphs:
                return fn(inputs)
            try:
                entry = self._capture(fn, inputs)
            except Exception as e:  # noqa: BLE001 - any capture failure: stay eager, say so once
                self.disabled = True
                self.graphs.clear()
                warnings.warn(f"CUDA graph capture failed, running eagerly from now on: {e}", stacklevel=2)
                return fn(inputs)
            self.graphs[key] = entry
        static_inputs, graph, static_outputs = entry
        for static, t in zip(static_inputs, inputs):
            static.copy_(t)
        graph.replay()
        self.replays += 1
        return [t.clone() for t in static_outputs]

    def _capture(self, fn: Callable[[Tensors], Tensors], inputs: Tensors) -> tuple[Tensors, torch.cuda.CUDAGraph, Tensors]:
        device = inputs[0].device.type
        static_inputs = [t.clone() for t in inputs]  # dense tensors keep their strides
        stream = torch.cuda.Stream(device=inputs[0].device)
        stream.wait_stream(torch.cuda.current_stream(inputs[0].device))
        with torch.cuda.stream(stream), _autocast_without_cache(device):
            for _ in range(self.warmup):  # compiles kernels, picks algorithms, fills caches outside the graph
                fn(static_inputs)
        torch.cuda.current_stream(inputs[0].device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a data loader's pinning thread may call CUDA meanwhile without breaking the capture
        with _autocast_without_cache(device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_outputs = fn(static_inputs)
        return static_inputs, graph, list(static_outputs)
