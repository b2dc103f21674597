"""A new prompt's text encoding replayed as a CUDA graph (engine/text_graph.py), checked on a CPU.

A CPU has no CUDA graphs, so ``StaticReplay`` stands in for one with the property that matters:
its outputs live in tensors captured once, and every replay rewrites them in place. With it, the
real adapters' prompt encoding (diffusers' ``encode_prompt`` over the tiny random text encoders)
must give each prompt the embeddings eager encoding gives it, still intact after later prompts
replayed the graph. The GPU suite compares real graph replays with eager encoding.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from livegen.engine.fastpath import FastStats
from livegen.engine.text_graph import GraphedTextEncoder, graph_text_encoders, text_encoders
from livegen.engine.worker import Worker
from livegen.settings import Settings

SD, SDXL = "stabilityai/sd-turbo", "stabilityai/sdxl-turbo"


class StaticReplay:
    """A CUDA graph's contract on a CPU: inputs copied into static tensors, outputs rewritten in
    the same tensors on every replay (what a caller keeps without copying is overwritten)."""

    def __init__(self, fn: Callable[..., Any], example: dict[str, torch.Tensor]) -> None:
        self.fn = fn
        self.static = {k: v.clone() for k, v in example.items()}
        self.output = fn(**self.static)
        self.replays = 0

    def replay(self, inputs: dict[str, torch.Tensor]) -> Any:
        for k, v in inputs.items():
            self.static[k].copy_(v)
        _rewrite(self.output, self.fn(**self.static))
        self.replays += 1
        return self.output


def _rewrite(static: Any, fresh: Any) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(fresh)
    elif isinstance(static, tuple):
        for s, f in zip(static, fresh, strict=True):
            _rewrite(s, f)
    else:
        for key in static.keys():
            _rewrite(static[key], fresh[key])


@pytest.fixture
def adapters(shared_data_dir: Path) -> dict[str, Any]:
    """Freshly loaded tiny adapters (the tests replace their text encoders' forward)."""
    worker = Worker(Settings(weights="tiny-random", device="cpu", data_dir=shared_data_dir, fast_path="on"))
    return {m: worker._load(m) for m in (SD, SDXL)}


def encoded(adapter: Any, prompt: str, negative: str = "", cfg: bool = False) -> list[torch.Tensor]:
    """The adapter's uncached encoding of one prompt: every tensor encode_prompt returns."""
    with torch.inference_mode():
        out = adapter._encode_prompt(prompt, negative, cfg)
    return [t for t in out if t is not None]


def replayed(adapter: Any, captures: list[StaticReplay] | None = None) -> FastStats:
    stats = FastStats()

    def capture(fn: Callable[..., Any], example: dict[str, torch.Tensor]) -> StaticReplay:
        graph = StaticReplay(fn, example)
        if captures is not None:
            captures.append(graph)
        return graph

    assert graph_text_encoders(adapter.t2i, capture, stats) == len(text_encoders(adapter.t2i))
    return stats


@pytest.mark.parametrize(("model", "cfg"), [(SD, False), (SD, True), (SDXL, False), (SDXL, True)])
def test_each_new_prompt_gets_its_own_embeddings_from_the_replayed_graph(
    adapters: dict[str, Any], model: str, cfg: bool
) -> None:
    """SD-Turbo's one encoder (last hidden state), SDXL's two (the penultimate hidden states and
    the pooled embedding), with and without a negative prompt (classifier-free guidance): each
    prompt's tensors equal eager encoding's exactly, and stay so after other prompts replayed."""
    adapter = adapters[model]
    prompts = ["a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen"]
    negative = "blurry" if cfg else ""
    eager = {p: encoded(adapter, p, negative, cfg) for p in prompts}
    captures: list[StaticReplay] = []
    stats = replayed(adapter, captures)
    kept = {p: encoded(adapter, p, negative, cfg) for p in prompts}
    for p in prompts:  # the first prompt's tensors after two more prompts rewrote the graphs' outputs
        assert len(kept[p]) == len(eager[p])
        for mine, theirs in zip(kept[p], eager[p], strict=True):
            assert torch.equal(mine, theirs), p
    # one graph per encoder (SD: last hidden state; SDXL: with hidden states), captured once
    assert len(captures) == stats.text_graphs == len(text_encoders(adapter.t2i))
    calls_per_prompt = len(captures) * (2 if cfg else 1)  # the negative prompt is encoded too
    assert stats.text_graph_replays == sum(g.replays for g in captures) == calls_per_prompt * len(prompts)


def test_other_calls_run_the_encoder_as_it_was(adapters: dict[str, Any]) -> None:
    """A batch of prompts, an attention mask or autograd: the eager encoder, no replay."""
    adapter = adapters[SD]
    encoder = adapter.t2i.text_encoder
    ids = adapter.t2i.tokenizer(["a", "b"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        before = encoder(ids)[0]
    stats = replayed(adapter)
    assert isinstance(encoder.forward, GraphedTextEncoder)
    with torch.inference_mode():
        assert torch.equal(encoder(ids)[0], before)  # two prompts at once
        encoder(ids[:1], attention_mask=torch.ones_like(ids[:1]))
    with torch.enable_grad():
        encoder(ids[:1])
    assert stats.text_graph_replays == 0 and stats.text_graphs == 0
    assert graph_text_encoders(adapter.t2i, lambda fn, example: StaticReplay(fn, example), stats) == 0  # once


def test_a_failed_capture_leaves_the_encoder_eager(adapters: dict[str, Any]) -> None:
    adapter = adapters[SD]
    want = encoded(adapter, "a red fox")
    stats = FastStats()

    def refuse(fn: Callable[..., Any], example: dict[str, torch.Tensor]) -> StaticReplay:
        raise RuntimeError("operation not permitted when stream is capturing")

    graph_text_encoders(adapter.t2i, refuse, stats)
    for _ in range(2):  # tried once, then eager without trying again
        assert all(torch.equal(a, b) for a, b in zip(encoded(adapter, "a red fox"), want, strict=True))
    assert stats.graph_failures == 1 and "stream is capturing" in stats.graph_error
    assert stats.text_graphs == stats.text_graph_replays == 0


def test_the_fast_path_graphs_text_encoders_only_on_cuda_with_graphs(
    shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On this CPU the encoders stay as they are; the setting reaches the fast path's options."""
    settings = Settings(weights="tiny-random", device="cpu", data_dir=shared_data_dir, fast_path="on")
    adapter = Worker(settings)._load(SD)
    assert not isinstance(adapter.t2i.text_encoder.forward, GraphedTextEncoder)
    assert adapter.fast.options.text_encoder_graph is True
    monkeypatch.setenv("LIVEGEN_TEXT_ENCODER_GRAPH", "false")
    off = Worker(Settings(weights="tiny-random", device="cpu", data_dir=shared_data_dir, fast_path="on"))
    assert off._load(SD).fast.options.text_encoder_graph is False
