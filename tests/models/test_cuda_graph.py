"""The CUDA-graph cache's bookkeeping, on CPU (a stand-in graph that recomputes): when it captures, what it
copies in and out, that it never evicts, and that copies of a module start empty. Real capture and replay on
CUDA: tests/test_gpu.py (``-m gpu``)."""

from __future__ import annotations

import copy
import pickle

import torch

from dyhead_cli.models.cuda_graph import GraphCache
from dyhead_cli.models.dyhead import DyHead


def test_graph_cache_stays_eager_until_a_signature_repeats_and_copies_empty():
    cache = GraphCache(capture_after=3)
    calls = []

    def fn(xs):
        calls.append(1)
        return [x * 2 for x in xs]

    x = [torch.ones(2)]
    for _ in range(2):  # below capture_after: plain calls, nothing captured (no CUDA needed)
        assert torch.equal(cache(fn, x)[0], torch.full((2,), 2.0))
    assert len(calls) == 2 and cache.replays == 0 and not cache.graphs
    assert cache.seen[GraphCache.signature(x)] == 2
    assert GraphCache.signature(x) != GraphCache.signature([torch.ones(3)])
    copied = copy.deepcopy(cache)
    assert isinstance(copied, GraphCache) and not copied.seen and copied.capture_after == 3
    assert pickle.loads(pickle.dumps(cache)).capture_after == 3


def test_tower_on_cpu_never_captures_and_deepcopies():
    tower = DyHead(16, 1).eval()
    feats = [torch.randn(1, 16, 8, 8), torch.randn(1, 16, 4, 4)]
    with torch.no_grad():
        for _ in range(3):
            tower(feats)
    assert tower.graphs.replays == 0 and not tower.graphs.seen
    clone = copy.deepcopy(tower)
    assert clone.graphs is not tower.graphs


class _RecomputingGraph:
    """Stands in for a CUDA graph on CPU: replay recomputes fn on the static inputs into the static outputs."""

    def __init__(self, fn, static_inputs, static_outputs):
        self.fn, self.static_inputs, self.static_outputs = fn, static_inputs, static_outputs

    def replay(self):
        for out, new in zip(self.static_outputs, self.fn(self.static_inputs)):
            out.copy_(new)


def test_graph_cache_copies_inputs_in_clones_outputs_out_and_never_evicts(monkeypatch):
    cache = GraphCache(max_graphs=1, capture_after=2)
    captured = []

    def fake_capture(fn, inputs):
        static_inputs = [t.clone() for t in inputs]
        static_outputs = fn(static_inputs)
        captured.append(GraphCache.signature(inputs))
        return static_inputs, _RecomputingGraph(fn, static_inputs, static_outputs), static_outputs

    monkeypatch.setattr(cache, "_capture", fake_capture)

    def fn(xs):
        return [xs[0] * 2 + 1]

    a, b = [torch.arange(4.0)], [torch.arange(6.0)]
    cache(fn, a)  # first sight: eager
    out = cache(fn, [a[0] + 10])  # second: captured, then replayed with these inputs
    assert len(captured) == 1 and cache.replays == 1 and torch.equal(out[0], (a[0] + 10) * 2 + 1)
    again = cache(fn, a)
    assert torch.equal(again[0], a[0] * 2 + 1) and again[0].data_ptr() != out[0].data_ptr()
    for _ in range(3):  # a second shape once the cache is full: eager every time, no capture, no eviction
        assert torch.equal(cache(fn, b)[0], b[0] * 2 + 1)
    assert len(captured) == 1 and len(cache.graphs) == 1 and cache.replays == 2
