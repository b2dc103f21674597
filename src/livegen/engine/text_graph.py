"""A new prompt's text encoding, replayed as a CUDA graph.

The fast path keeps each prompt's embeddings (the adapters' cache), so a session sending the same
prompt encodes it once. A new prompt, as in a session whose prompt follows what its user types,
runs the text encoder eagerly. At one prompt of 77 tokens its kernels are tiny and the host
launching them is the cost: SD-Turbo's OpenCLIP-H encoder is 493 aten ops per prompt, SDXL's two
encoders 286 + 683 (counted on a CPU, BENCHMARKS.md session 17). Eager PyTorch issues about one
op per 22 µs on the GPU hosts measured here (session 8: the eager fast path, 28.6 ms for 1,304 ops
at batch 1), so a new prompt should cost ~11 ms (SD-Turbo) or ~21 ms (SDXL-Turbo) of the device
thread before its batch can start, more than the batch itself (an estimate: ``tests/gpu`` and
``livegen bench --new-prompts`` measure it).

``GraphedTextEncoder`` replaces a text encoder's ``forward`` for the calls diffusers'
``encode_prompt`` makes for one prompt (token ids of shape (1, 77), no attention mask, with or
without all hidden states). The first such call captures a CUDA graph of the encoder; later ones
copy the ids into it and replay it: the same computation, without the launches (the GPU suite
compares it with eager encoding).
Every other call (batches of prompts, masks, autograd) runs the encoder as it was; the fast path
installs it only on CUDA with graphs. A graph writes its outputs into the same memory on every
replay, and the adapters cache what ``encode_prompt`` returns, in places the outputs themselves
(SDXL's pooled embeddings with a negative prompt), so each replay's outputs are copied out before
they are returned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)

TOKENS = 77  # CLIP's context: encode_prompt pads every prompt to it


class Replay(Protocol):
    """A captured call over static inputs: ``replay`` copies ``inputs`` in and returns the
    captured outputs, rewritten in place (``fastpath._Graph``)."""

    output: Any

    def replay(self, inputs: dict[str, torch.Tensor]) -> Any: ...


Capture = Callable[[Callable[..., Any], dict[str, torch.Tensor]], Replay]


class Counts(Protocol):
    """Where the counts go (``fastpath.FastStats``)."""

    text_graphs: int
    text_graph_replays: int
    graph_failures: int
    graph_error: str


class GraphedTextEncoder:
    """``encoder.forward`` for one prompt's token ids as a replayed graph; see the module's doc."""

    def __init__(self, encoder: torch.nn.Module, capture: Capture, stats: Counts) -> None:
        self.encoder = encoder
        self.eager = encoder.forward
        self.capture = capture
        self.stats = stats
        self.graphs: dict[bool, Replay | None] = {}  # by output_hidden_states; None: capture failed

    def install(self) -> None:
        self.encoder.forward = self  # type: ignore[method-assign]

    def __call__(self, input_ids: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        if input_ids is None or not self._eligible(input_ids, args, kwargs):
            return self.eager(input_ids, *args, **kwargs)
        hidden = bool(kwargs.get("output_hidden_states"))
        if hidden not in self.graphs:
            self.graphs[hidden] = self._capture(hidden, input_ids)
        graph = self.graphs[hidden]
        if graph is None:
            return self.eager(input_ids, *args, **kwargs)
        self.stats.text_graph_replays += 1
        return _copied(graph.replay({"input_ids": input_ids}))

    @staticmethod
    def _eligible(input_ids: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """The call encode_prompt makes for one prompt, and nothing else: ids (1, 77), with or
        without all hidden states, no mask or other arguments, no autograd."""
        return (
            not args
            and all(v is None for k, v in kwargs.items() if k != "output_hidden_states")
            and kwargs.get("output_hidden_states") in (None, False, True)
            and tuple(input_ids.shape) == (1, TOKENS)
            and not torch.is_grad_enabled()
        )

    def _capture(self, hidden: bool, input_ids: torch.Tensor) -> Replay | None:
        def run(input_ids: torch.Tensor) -> Any:
            return self.eager(input_ids, output_hidden_states=hidden)

        try:
            graph = self.capture(run, {"input_ids": input_ids})
        except RuntimeError as exc:  # capture-unsafe: encode eagerly, and say so
            logger.exception("the text encoder's CUDA graph capture failed; its prompts are encoded eagerly")
            self.stats.graph_failures += 1
            self.stats.graph_error = f"{type(exc).__name__}: {exc}"[:300]
            return None
        self.stats.text_graphs += 1
        logger.info("captured a CUDA graph of %s (hidden states: %s)", type(self.encoder).__name__, hidden)
        return graph


def _copied(output: Any) -> Any:
    """The encoder's output with every tensor copied out of the graph's memory (tuples of hidden
    states included), in its own class (a transformers ``ModelOutput``)."""

    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, tuple):
            return tuple(copy(v) for v in value)
        return value

    return type(output)(**{k: copy(v) for k, v in output.items()})


def text_encoders(pipe: Any) -> list[torch.nn.Module]:
    """The pipeline's text encoders (SDXL has two)."""
    return [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e is not None]


def graph_text_encoders(pipe: Any, capture: Capture, stats: Counts) -> int:
    """Replace each of ``pipe``'s text encoders' forward with a ``GraphedTextEncoder`` (once).
    Returns how many were replaced."""
    changed = 0
    for encoder in text_encoders(pipe):
        if not isinstance(encoder.forward, GraphedTextEncoder):
            GraphedTextEncoder(encoder, capture, stats).install()
            changed += 1
    return changed
