"""Rewrite matched attention sites of a dynamo graph into the NSA op, on a copy of the graph.

New graph inputs are appended after the existing placeholders, in this order: the video mask (``nsa_video_mask``,
only when the graph has no mask source of its own), then the gate parameters of every rewritten site. When the
graph holds a mask source, its [B, T] mask can be appended to the outputs so that the backend records it for later
graphs (graph breaks put the merge and the decoder layers in different graphs).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from ..config import NSAConfig
from ..gates import NSAGate, gate_forward
from .attention import AttentionSite, _val
from .video_mask import MaskSource, mask_from_input_ids, mask_from_merge
from ..kernels.nsa import records_grad


@dataclass
class Rewrite:
    """The rewritten graph and what its caller must append to the inputs / strip from the outputs.

    Inputs appended in order: the video mask [B, T] bool when ``needs_runtime_mask`` (``example_mask`` is one of
    the right shape for tracing), then ``gate_params``. When ``records_mask``, the last output is the video mask.
    """

    gm: fx.GraphModule
    needs_runtime_mask: bool
    records_mask: bool
    gate_params: list[torch.Tensor] = field(default_factory=list)
    example_mask: torch.Tensor | None = None
    sites: int = 0
    source_kind: str = ""


def rewrite_graph(gm: fx.GraphModule, sites: list[tuple[AttentionSite, NSAGate]], source: MaskSource | None,
                  config: NSAConfig, record_mask: bool) -> Rewrite:
    """Copy ``gm``, replace each site's output by ``nsa_compile::nsa_attention`` with gates from its hidden states,
    and wire the video mask (from ``source`` or a new input). ``gm`` itself is not modified."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out_val = graph.graph_copy(gm.graph, env)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    cursor = placeholders[-1] if placeholders else None

    def new_input(name: str, example=None) -> fx.Node:
        nonlocal cursor
        if cursor is None:
            with graph.inserting_before(next(iter(graph.nodes), None)):
                node = graph.placeholder(name)
        else:
            with graph.inserting_after(cursor):
                node = graph.placeholder(name)
        node.meta["example_value"] = example
        cursor = node
        return node

    mask = None
    needs_runtime_mask = False
    if source is not None and source.kind == "merge":
        last = max((env[n] for n in source.nodes), key=lambda n: _index(graph, n))
        with graph.inserting_after(last):
            mask = graph.call_function(mask_from_merge, tuple(env[n] for n in source.nodes))
    elif source is not None:
        with graph.inserting_after(env[source.nodes[0]]):
            mask = graph.call_function(mask_from_input_ids, (env[source.nodes[0]], source.token_ids))
    elif sites:
        mask = new_input("nsa_video_mask")
        needs_runtime_mask = True

    params: list[torch.Tensor] = []
    for i, (site, gate) in enumerate(sites):
        gate_inputs = []
        for j, p in enumerate(gate.gate_parameters()):
            gate_inputs.append(new_input(f"nsa_gate_{i}_{j}", p))
            params.append(p)
        q = _val(site.q)
        if isinstance(site.scale, fx.Node):
            scale = env[site.scale]
        else:
            scale = float(site.scale if site.scale is not None else 1.0 / math.sqrt(q.shape[-1]))
        node = env[site.node]
        with graph.inserting_before(node):
            gates = graph.call_function(gate_forward, (env[site.hidden], gate.kind, gate.heads, gate.temperature,
                                                       tuple(config.gate_init), *gate_inputs))
            attn_mask = _op_mask(graph, env, site)
            args = (env[site.q], env[site.k], env[site.v], gates, mask, attn_mask, scale, config.block_size,
                    config.block_stride, config.selection_block_size, config.top_n, config.window_size)
            if config.decode != "sparse" and records_grad(_val(site.q), _val(site.k), _val(site.v),
                                                          *gate.gate_parameters()):
                # training: the op's twin that also returns the top-n ids and log-sum-exps, which its backward reuses
                pair = graph.call_function(torch.ops.nsa_compile.nsa_attention_with_state.default, args)
                out = graph.call_function(operator.getitem, (pair, 0))
            else:
                out = graph.call_function(_nsa_op(config), args)
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        _erase_dead(graph, node)

    if record_mask and mask is not None and not needs_runtime_mask:
        out_val = tuple(out_val) + (mask,) if isinstance(out_val, (tuple, list)) else (out_val, mask)
    else:
        record_mask = False
    graph.output(out_val)
    graph.lint()
    return Rewrite(fx.GraphModule(gm, graph), needs_runtime_mask, record_mask, params, sites=len(sites))


def _op_mask(graph: fx.Graph, env: dict, site: AttentionSite) -> fx.Node | None:
    """The ``attn_mask`` argument of the op for ``site`` (inserted before the op): none for a causal mask, the AND
    of its per-key terms for causal + key padding, the whole mask otherwise (see `passes.attention.analyse_mask`).
    A mask left without users is erased with the replaced attention."""
    plan = site.mask
    if plan is None or plan.kind in ("", "opaque"):
        return env[site.attn_mask] if isinstance(site.attn_mask, fx.Node) else None
    if plan.kind == "causal":
        return None
    out = env[plan.keys[0]]
    for key in plan.keys[1:]:
        out = graph.call_function(torch.logical_and, (out, env[key]))
    return out


def _nsa_op(config: NSAConfig):
    """``nsa_compile::nsa_attention``, or its twin with the same schema that keeps compressed video K/V for sparse
    decode when ``config.decode == "sparse"`` (`kernels.decode`)."""
    if config.decode == "sparse":
        return torch.ops.nsa_compile.nsa_attention_sparse_decode.default
    return torch.ops.nsa_compile.nsa_attention.default


def _erase_dead(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` and the computations that only fed it (the replaced QKᵀ/softmax/matmul chain and
    ``repeat_kv``), never placeholders or in-place calls."""
    frontier = [node]
    while frontier:
        n = frontier.pop()
        if n.users or n.op not in ("call_function", "call_method"):
            continue
        name = getattr(n.target, "__name__", str(n.target))
        if name.endswith("_") and not name.endswith("__"):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        frontier.extend(inputs)


def _index(graph: fx.Graph, node: fx.Node) -> int:
    for i, n in enumerate(graph.nodes):
        if n is node:
            return i
    raise KeyError(node)
