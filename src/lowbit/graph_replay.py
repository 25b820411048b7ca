"""Calling a compiled decode step's graph directly, without Dynamo's per-call work.

A ``torch.compile``d function pays, on every call, for Dynamo's frame evaluation: the cache-entry
lookup and guards, the bytecode that gathers the graph's inputs (every parameter and cache tensor
of the model) and that rebuilds the Python result. For a small model's decode step that is ~50 µs
of a ~250 µs token (demo model, 2 cores). Between the steps of one greedy generation nothing of
that changes except the token fed in, so the graph Inductor compiled can be called with the same
input list and the new token in place of the old one.

:class:`RecordingBackend` is an Inductor backend (``compile_fx`` with the given options) that
wraps each graph it compiles in a :class:`RecordedGraph`, which remembers the inputs and outputs
of its last call. After a step that went through Dynamo, :func:`replay_after` checks what that
step did and, only when everything is accounted for, returns a :class:`Replay` for the following
steps:
- exactly one compiled graph ran, exactly once (no graph break, no recompilation);
- its outputs are, by identity, the ``(token, logits)`` the step returned (nothing computed after
  the graph);
- the token fed in is one of its inputs, exactly once, by identity; every other input (weights,
  KV-cache tensors, the position tensor, which the loop updates in place) is the same object at
  every step of a generation.
Otherwise the loop keeps calling through Dynamo. Each generation's first step goes through
Dynamo with its guards, so a changed model or setting recompiles or is rejected as usual.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

Graph = Callable[..., Any]


class RecordedGraph:
    """One Inductor-compiled graph, callable as Dynamo calls it, recording its last call."""

    def __init__(self, compiled: Graph) -> None:
        self.compiled = compiled  # called with the inputs as arguments, as Dynamo calls it
        self.calls = 0
        self.last_args: list[Any] = []
        self.last_out: Any = None

    def entry(self) -> Graph:
        """The function handed back to Dynamo (which calls it with the inputs as arguments)."""
        def call(*args: Any) -> Any:
            self.last_args, self.calls = list(args), self.calls + 1
            self.last_out = self(self.last_args)
            return self.last_out

        return call

    def __call__(self, args: list[Any]) -> Any:
        return self.compiled(*args)


class RecordingBackend:
    """``torch.compile(backend=RecordingBackend(options))``: Inductor with ``options`` (as
    ``torch.compile(options=...)`` passes them), recording every graph it compiles."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.graphs: list[RecordedGraph] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Graph:
        from torch._inductor.compile_fx import compile_fx

        graph = RecordedGraph(compile_fx(gm, list(example_inputs), config_patches=dict(self.options)))
        self.graphs.append(graph)
        return graph.entry()

    def call_counts(self) -> list[int]:
        return [g.calls for g in self.graphs]


class Replay:
    """The graph of a generation's first compiled step, called with each new token."""

    def __init__(self, graph: RecordedGraph, args: list[Any], token_index: int) -> None:
        self.graph, self.args, self.token_index = graph, args, token_index

    def __call__(self, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        args = list(self.args)
        args[self.token_index] = token
        out = self.graph(args)
        return out[0], out[1]


def replay_after(backend: RecordingBackend, counts_before: list[int], token_in: torch.Tensor,
                 result: tuple[torch.Tensor, torch.Tensor]) -> Replay | None:
    """A :class:`Replay` of the step that just ran (``token_in`` → ``result``), or None when the
    step is not exactly one recorded graph call (see the module docstring)."""
    before = counts_before + [0] * (len(backend.graphs) - len(counts_before))  # graphs compiled by the step: 0
    ran = [(g, g.calls - n) for g, n in zip(backend.graphs, before) if g.calls != n]
    if len(ran) != 1 or ran[0][1] != 1:
        return None
    graph = ran[0][0]
    out = graph.last_out
    if not isinstance(out, (list, tuple)) or len(out) != 2 or out[0] is not result[0] or out[1] is not result[1]:
        return None
    where = [i for i, arg in enumerate(graph.last_args) if arg is token_in]
    if len(where) != 1:
        return None
    return Replay(graph, graph.last_args, where[0])
