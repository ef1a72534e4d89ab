"""Activation recomputation for ExecuTorch training programs: backward recomputes each layer's activations.

A joint forward+backward graph keeps every value backward reads alive from the forward pass on: for an adapted
encoder layer that is ~40 MB at batch 8, seq 128 (MiniLM). `mark_layer_inputs` tags the hidden state entering
each encoder layer (and the last one's output) while the model is exported; `recompute_activations` then gives
backward its own copy of every other forward value it reads, computed from those tags just before backward first
needs it. Only the layer inputs (one hidden state each) live across the passes; each layer's activations exist
once in forward and again, briefly, in its own backward. The numbers are unchanged; a step costs one more forward
through the adapted layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

MARK = "fedhft::layer_input"


@torch.library.custom_op(MARK, mutates_args=())
def _layer_input(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_layer_input.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


_layer_input.register_autograd(lambda ctx, grad: grad)


def _mark(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return _layer_input(value)
    if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
        return (_layer_input(value[0]), *value[1:])
    return value


@contextmanager
def mark_layer_inputs(layers: list[nn.Module]) -> Iterator[None]:
    """While active, the hidden state entering each of `layers` and the last one's output pass through the
    `fedhft::layer_input` marker (an identity); `recompute_activations` finds and removes the markers."""

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (_mark(args[0]), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": _mark(kwargs["hidden_states"])}
        return args, kwargs

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in layers]
    if layers:
        handles.append(layers[-1].register_forward_hook(lambda module, args, out: _mark(out)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _is_mark(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.fedhft.layer_input.default


def _tensor_valued(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return bool(val) and all(isinstance(v, torch.Tensor) for v in val if v is not None)
    return isinstance(val, torch.Tensor)


def remove_marks(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Drop the markers (each use reads the marked value directly); return the marked values."""
    kept = set()
    for node in list(gm.graph.nodes):
        if _is_mark(node):
            src = node.args[0]
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            kept.add(src)
    return kept


MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)


def recompute_activations(
    gm: torch.fx.GraphModule, forward_outputs: list[torch.fx.Node], keep_matmuls: bool = False
) -> int:
    """Rewire backward reads of forward values (other than the marked layer inputs, graph inputs and constants)
    to recomputations placed just before their first backward reader. `forward_outputs` are the joint graph's
    forward results (loss, logits): every node up to the last of them is the forward pass. Returns how many
    nodes were cloned; 0 when the graph carries no markers (nothing changes then but the markers' removal).
    `keep_matmuls` keeps the linear layers' outputs too, so backward recomputes only the cheap ops around them
    (attention maps, softmax, GELU, layer norms, reshapes)."""
    checkpoints = remove_marks(gm)
    if not checkpoints:
        return 0
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    end = max(order[n] for n in forward_outputs)  # backward was traced after the forward pass ended
    forward = {n for n, i in order.items() if i <= end}
    clones: dict[torch.fx.Node, torch.fx.Node] = {}
    made: set[torch.fx.Node] = set()

    def recomputable(n: torch.fx.Node) -> bool:
        if keep_matmuls and n.target in MATMULS:
            return False
        return n in forward and n.op == "call_function" and n not in checkpoints and _tensor_valued(n)

    def clone(n: torch.fx.Node, before: torch.fx.Node) -> torch.fx.Node:
        if not recomputable(n):
            return n
        if n in clones:
            return clones[n]
        args = torch.fx.node.map_arg(n.args, lambda a: clone(a, before))
        kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: clone(a, before))
        with gm.graph.inserting_before(before):
            c = gm.graph.call_function(n.target, args, kwargs)  # type: ignore[arg-type]
        c.meta = dict(n.meta)
        clones[n] = c
        made.add(c)
        return c

    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node in forward or node in made:
            continue
        if not any(recomputable(a) for a in node.all_input_nodes):
            continue
        node.args = torch.fx.node.map_arg(node.args, lambda a, at=node: clone(a, at))
        node.kwargs = torch.fx.node.map_arg(node.kwargs, lambda a, at=node: clone(a, at))
    gm.graph.lint()
    gm.recompile()
    return len(clones)
