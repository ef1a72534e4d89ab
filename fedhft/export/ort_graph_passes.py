"""Graph passes over ORT training models (onnx only, no runtime).

`recompute_dequantized_weights`: with an int8 base, the gradient graph reuses the dequantized fp32 weight of every
adapted layer (dX = dY · W), so ORT keeps all of them alive from the forward pass to the backward pass: the int8
base then saves nothing in the layers that backward goes through. The pass gives each gradient consumer its own
DequantizeLinear of the int8 weight, gated on that consumer's incoming gradient so it cannot run before the
backward pass reaches it; the forward copy then dies right after its forward MatMul.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper


@dataclass(frozen=True)
class DequantChain:
    weight_q: str  # int8 weight (graph input / initializer)
    scale: str  # fp32 per-row scale (graph input / initializer)
    output: str  # the fp32 tensor the gradient graph consumes (possibly transposed)
    transposed: bool


def _find_chains(graph: onnx.GraphProto) -> list[DequantChain]:
    """Cast(weight_q) -> Mul(., Unsqueeze(scale)) [-> Transpose] chains of FrozenLinear.dequantized_weight()."""
    prod = {o: n for n in graph.node for o in n.output}
    cons: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            cons[i].append(n)
    chains = []
    for cast in graph.node:
        if cast.op_type != "Cast" or not cast.input[0].endswith("weight_q"):
            continue
        muls = [n for n in cons[cast.output[0]] if n.op_type == "Mul"]
        if len(muls) != 1:
            continue
        mul = muls[0]
        other = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
        unsq = prod.get(other)
        if unsq is None or unsq.op_type != "Unsqueeze" or not unsq.input[0].endswith("weight_scale"):
            continue
        out, transposed = mul.output[0], False
        nxt = cons[out]
        if len(nxt) == 1 and nxt[0].op_type == "Transpose":
            out, transposed = nxt[0].output[0], True
        chains.append(DequantChain(cast.input[0], unsq.input[0], out, transposed))
    return chains


def recompute_dequantized_weights(model: onnx.ModelProto) -> int:
    """Rewire gradient consumers of dequantized weights to gated recomputations; return how many were rewired."""
    graph = model.graph
    rewired = 0
    for chain in _find_chains(graph):
        consumers = [n for n in graph.node if chain.output in n.input and "_Grad/" in n.name]
        for k, node in enumerate(consumers):
            grads = [i for i in node.input if i and i != chain.output]
            if not grads:
                continue
            p = f"{chain.output}/recompute_{k}"
            new_nodes = [
                helper.make_node("Size", [grads[0]], [f"{p}/size"], name=f"{p}/Size"),
                helper.make_node("Cast", [f"{p}/size"], [f"{p}/size_f"], name=f"{p}/Cast", to=TensorProto.FLOAT),
                helper.make_node("Sign", [f"{p}/size_f"], [f"{p}/gate"], name=f"{p}/Sign"),
                helper.make_node("Mul", [chain.scale, f"{p}/gate"], [f"{p}/scale"], name=f"{p}/GateScale"),
                helper.make_node("Sub", [f"{p}/scale", f"{p}/scale"], [f"{p}/zeros_f"], name=f"{p}/Zeros"),
                helper.make_node(
                    "Cast", [f"{p}/zeros_f"], [f"{p}/zero_point"], name=f"{p}/ZeroPoint", to=TensorProto.INT8
                ),
                helper.make_node(
                    "DequantizeLinear",
                    [chain.weight_q, f"{p}/scale", f"{p}/zero_point"],
                    [f"{p}/w"],
                    name=f"{p}/DequantizeLinear",
                    axis=0,
                ),
            ]
            out = f"{p}/w"
            if chain.transposed:
                new_nodes.append(helper.make_node("Transpose", [out], [f"{p}/wt"], name=f"{p}/Transpose", perm=[1, 0]))
                out = f"{p}/wt"
            for i, name in enumerate(node.input):
                if name == chain.output:
                    node.input[i] = out
            pos = list(graph.node).index(node)
            for j, n in enumerate(new_nodes):
                graph.node.insert(pos + j, n)
            rewired += 1
    return rewired
