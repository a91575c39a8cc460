"""Find attention in a dynamo graph and decide which of it is language-model self-attention.

Two forms are matched on the graph dynamo hands a backend (before AOTAutograd, so each call has one form):

* ``sdpa``: one ``torch._C._nn.scaled_dot_product_attention`` call (``F.scaled_dot_product_attention``), with or
  without ``attn_mask`` / ``is_causal`` / ``enable_gqa``;
* ``eager``: ``matmul(q, kᵀ) → ·scale → (+ mask) → softmax → (to, dropout) → matmul(·, v)``.

K/V repeated for GQA by transformers' ``repeat_kv`` (``x[:, :, None].expand(...).reshape(...)``) are traced back to
the un-repeated tensors so that the selection branch shares blocks across each GQA group. The aten forms
(``aten.scaled_dot_product_attention``, ``aten._scaled_dot_product_*``) are matched too, for graphs that reach us
already lowered.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from ..kernels.common import MAX_HEAD_DIM, SUPPORTED_DTYPES

# Module-path fragments of vision encoders (a small table of names, not per-model patches).
VISION_PATH_KEYS = ("visual", "vision", "video_tower", "image_tower", "image_encoder", "img_encoder", "mm_projector",
                    "multi_modal_projector")

_SDPA_TARGETS = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention,
                 torch.ops.aten.scaled_dot_product_attention.default}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
# Device-specific aten forms (after dispatch): positional argument names; each returns a tuple whose item 0 is the
# attention output. K/V arrive already repeated for GQA there (no enable_gqa).
_ATEN_FORMS = {}
for _name, _args in (
        ("_scaled_dot_product_flash_attention_for_cpu", ("query", "key", "value", "dropout_p", "is_causal")),
        ("_scaled_dot_product_flash_attention", ("query", "key", "value", "dropout_p", "is_causal")),
        ("_scaled_dot_product_efficient_attention", ("query", "key", "value", "attn_mask", "compute_log_sumexp",
                                                     "dropout_p", "is_causal")),
        ("_scaled_dot_product_cudnn_attention", ("query", "key", "value", "attn_mask", "compute_log_sumexp",
                                                 "dropout_p", "is_causal"))):
    if hasattr(torch.ops.aten, _name):
        _ATEN_FORMS[getattr(torch.ops.aten, _name).default] = _args
_MATMUL = {torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm"}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax, "softmax"}
_LINEAR = {torch._C._nn.linear, F.linear}


@dataclass
class AttentionSite:
    """One attention call in a graph.

    Attributes:
        form: ``"sdpa"`` or ``"eager"``; node: the node whose value is the attention output [B, Hq, Tq, Dv];
        q, k, v: nodes of [B, Hq, Tq, D] and [B, Hkv, Tk, D] (K/V un-repeated); attn_mask: mask node or None;
        is_causal: the call's flag; scale: softmax scale (None: 1/sqrt(D); a node when computed in the graph); module: the module path from
        ``nn_module_stack`` (``""`` when dynamo recorded none); hidden: the attention-input hidden states
        [B, Tq, hidden] feeding the query projection, or None.
    """

    form: str
    node: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    attn_mask: fx.Node | None
    is_causal: bool
    scale: float | fx.Node | None
    module: str
    module_type: str
    hidden: fx.Node | None
    mask: MaskPlan | None = None  # set by `find_attention_sites` (`analyse_mask`)


def _val(node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("example_value", node.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def _target_is(node: fx.Node, targets) -> bool:
    return node.op in ("call_function", "call_method") and node.target in targets


def _module_of(node: fx.Node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", ""
    path, typ = list(stack.values())[-1]
    return str(path), getattr(typ, "__name__", str(typ))


def unrepeat_kv(node: fx.Node) -> fx.Node:
    """The tensor before transformers' ``repeat_kv`` (getitem[:, :, None] / unsqueeze(2) → expand → reshape)."""
    if _target_is(node, {"reshape", torch.reshape, "view"}) and isinstance(node.args[0], fx.Node):
        e = node.args[0]
        if _target_is(e, {"expand"}) and isinstance(e.args[0], fx.Node):
            u = e.args[0]
            if _target_is(u, {operator.getitem}) and isinstance(u.args[1], tuple) and len(u.args[1]) > 2 \
                    and u.args[1][2] is None:
                return u.args[0]
            if _target_is(u, {"unsqueeze", torch.unsqueeze}) and u.args[1:] == (2,):
                return u.args[0]
    return node


def attention_input(q: fx.Node, limit: int = 64) -> fx.Node | None:
    """The input of the query projection (``linear``) that ``q`` derives from: the attention-input hidden states."""
    seen, frontier = set(), [q]
    while frontier and len(seen) < limit:
        n = frontier.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if _target_is(n, _LINEAR):
            return n.args[0]
        frontier.extend(a for a in n.all_input_nodes if a.op != "placeholder")
    return None


def _sdpa_site(node: fx.Node) -> AttentionSite | None:
    names = _ATEN_FORMS.get(node.target, _SDPA_ARGS)
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    if "attn_bias" in args:
        args["attn_mask"] = args.pop("attn_bias")
    out = node
    if node.target in _ATEN_FORMS:  # the output is item 0 of the returned tuple
        users = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if len(users) != 1:
            return None
        out = users[0]
    scale = args.get("scale")
    if scale is not None and not isinstance(scale, fx.Node):  # a node: a scale computed in the graph (dynamic)
        scale = float(scale)
    module, typ = _module_of(node)
    k, v = unrepeat_kv(args["key"]), unrepeat_kv(args["value"])
    return AttentionSite("sdpa", out, args["query"], k, v, args.get("attn_mask"), bool(args.get("is_causal", False)),
                         scale, module, typ, attention_input(args["query"]))


def _eager_site(softmax: fx.Node) -> AttentionSite | None:
    # backwards: softmax ← [add mask] ← [mul/div scale] ← matmul(q, transpose(k))
    x, mask, scale = softmax.args[0], None, None
    if _target_is(x, {operator.add, torch.add, "add"}):
        x, mask = x.args[0], x.args[1]
    if _target_is(x, {operator.mul, torch.mul, "mul"}) and isinstance(x.args[1], (int, float)):
        x, scale = x.args[0], float(x.args[1])
    elif _target_is(x, {operator.truediv, torch.div, "div"}) and isinstance(x.args[1], (int, float)):
        x, scale = x.args[0], 1.0 / float(x.args[1])
    if not _target_is(x, _MATMUL) or scale is None:
        return None
    q, kt = x.args[0], x.args[1]
    if not _target_is(kt, {"transpose", torch.transpose}):
        return None
    k = kt.args[0]
    # forwards: softmax → [to] → [dropout] → matmul(·, v)
    y = softmax
    while len(y.users) == 1:
        (u,) = y.users
        if _target_is(u, {"to", "type_as", F.dropout, torch.dropout, "float"}):
            y = u
            continue
        if _target_is(u, _MATMUL) and u.args[0] is y:
            module, typ = _module_of(u)
            return AttentionSite("eager", u, q, unrepeat_kv(k), unrepeat_kv(u.args[1]), mask, False, scale,
                                 module, typ, attention_input(q))
        break
    return None


def find_attention_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    """Every SDPA call and every eager softmax-attention pattern of ``gm``, in graph order, each with what its
    ``attn_mask`` does (`analyse_mask`)."""
    sites = []
    for node in gm.graph.nodes:
        if _target_is(node, _SDPA_TARGETS) or _target_is(node, _ATEN_FORMS):
            site = _sdpa_site(node)
        elif _target_is(node, _SOFTMAX):
            site = _eager_site(node)
        else:
            continue
        if site is not None:
            site.mask = analyse_mask(site)
            sites.append(site)
    return sites


def skip_reason(site: AttentionSite, have_video_ids: bool) -> str | None:
    """Why ``site`` must stay dense, or None when it is language-model self-attention we can rewrite."""
    path = site.module.lower()
    if any(key in path for key in VISION_PATH_KEYS):
        return "vision-encoder attention"
    q, k = _val(site.q), _val(site.k)
    if q is None or k is None:
        return "no shape information on q/k"
    causal_single = isinstance(q.shape[2], int) and q.shape[2] == 1
    if not site.is_causal and site.attn_mask is None and not causal_single:
        return "non-causal attention (no mask, is_causal=False): not decoder self-attention"
    if not site.module:
        return "no module path recorded by dynamo: no attention module to attach gates to"
    if site.hidden is None:
        return "query projection (linear) not found upstream of q: no hidden states for the gates"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} not supported (supported: fp16, bf16, fp32, fp64)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} not supported"
    if q.device.type not in ("cpu", "cuda"):
        return f"device {q.device.type} not supported (cpu, cuda)"
    if q.shape[1] % k.shape[1] != 0:
        return f"{q.shape[1]} query heads over {k.shape[1]} key heads is not GQA"
    if not have_video_ids:
        return ("video tokens cannot be identified: no vision merge in the graph and no video_token_id in the "
                "NSAConfig or the model config")
    return None


# ------------------------------------------------------------------------------------ attn_mask analysis
@dataclass
class MaskPlan:
    """What a site's ``attn_mask`` does, read from the graph that builds it (`analyse_mask`).

    ``kind``: ``""`` (no mask); ``"causal"`` (exactly causal attention: the op needs no mask); ``"causal+keys"``
    (causal attention AND per-key terms such as a padding mask: the op gets only ``keys``, each broadcastable
    to [B, 1, 1, Tk], bool); ``"opaque"`` (anything else, passed whole: the op checks it at run time).
    ``why`` says, for an opaque mask, what was not understood.
    """

    kind: str
    keys: tuple = ()
    why: str = ""


_PASS_THROUGH = {"to", "contiguous", "bool", "clone"}
_AND = {operator.and_, torch.logical_and, torch.bitwise_and, "logical_and", "bitwise_and", "__and__", operator.mul,
        torch.mul, "mul"}
_RELATIONS = {operator.le: "le", torch.le: "le", "le": "le", operator.ge: "ge", torch.ge: "ge", "ge": "ge",
              operator.lt: "lt", torch.lt: "lt", "lt": "lt", operator.gt: "gt", torch.gt: "gt", "gt": "gt"}


def _expr(x):
    """A python int / SymInt / node holding one, as a sympy expression (None for anything else)."""
    import sympy
    if isinstance(x, fx.Node):
        x = x.meta.get("example_value", x.meta.get("val"))
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return sympy.Integer(x)
    if isinstance(x, torch.SymInt):
        return x.node.expr
    return None


def _same(a, b) -> bool:
    import sympy
    return a is not None and b is not None and sympy.simplify(a - b) == 0


def _unwrap(node):
    """Follow value-preserving wrappers (``.to`` / ``contiguous`` without a dtype change, ``expand``, full slices)
    and an additive form ``where(m, 0, very negative)`` down to the boolean mask they carry."""
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method"):
        out, first = _val(node), node.args[0] if node.args else None
        src = _val(first) if isinstance(first, fx.Node) else None
        if node.target in _PASS_THROUGH or node.target == "expand" or (
                node.target is operator.getitem and isinstance(node.args[1], tuple)
                and all((isinstance(s, slice) and s.step in (None, 1)) or s is Ellipsis for s in node.args[1])):
            if out is None or src is None or out.dtype != src.dtype or (
                    node.target != "expand" and tuple(out.shape) != tuple(src.shape)):
                return node
            node = first
            continue
        if node.target is torch.where and len(node.args) == 3 and out is not None and out.dtype.is_floating_point:
            zero, neg = _scalar(node.args[1]), _scalar(node.args[2])
            if zero == 0.0 and neg is not None and neg <= -1e4:
                node = first
                continue
        return node
    return node


def _scalar(x) -> float | None:
    """The value of a python number, or of a graph node that makes a one-element constant (``torch.zeros(())``,
    ``torch.tensor(c)``, ``torch.full((), c)``); None otherwise."""
    if isinstance(x, fx.Node):
        if x.op != "call_function":
            return None
        if x.target in (torch.zeros, torch.zeros_like):
            return 0.0
        if x.target is torch.tensor and x.args:
            x = x.args[0]
        elif x.target is torch.full and len(x.args) == 2:
            x = x.args[1]
        else:
            return None
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    return None


def _position_index(node):
    """(axis from the end, length, offset) when ``node`` is ``arange(n) + c`` placed on one axis by indexing with
    ``None``s and one full slice (how transformers builds q / kv positions; ``+ c`` before or after), else None."""
    axis, ndim, offset, placed = 0, 1, _expr(0), False
    while isinstance(node, fx.Node):
        if _target_is(node, {operator.add, torch.add, "add", operator.sub, torch.sub, "sub"}):
            a, b = node.args[0], node.args[1]
            sign = -1 if node.target in (operator.sub, torch.sub, "sub") else 1
            if isinstance(a, fx.Node) and _val(a) is not None and _expr(b) is not None:
                offset, node = offset + sign * _expr(b), a
            elif sign == 1 and isinstance(b, fx.Node) and _val(b) is not None and _expr(a) is not None:
                offset, node = offset + _expr(a), b
            else:
                return None
        elif not placed and _target_is(node, {operator.getitem}) and isinstance(node.args[1], tuple):
            idx = node.args[1]
            full = [i for i, s in enumerate(idx) if isinstance(s, slice) and s == slice(None)]
            if len(full) != 1 or any(s is not None for i, s in enumerate(idx) if i != full[0]):
                return None
            axis, ndim, node, placed = full[0], len(idx), node.args[0], True
        else:
            break
    if not _target_is(node, {torch.arange}) or node.kwargs.get("step", 1) != 1 or len(node.args) not in (1, 2):
        return None
    start, end = (0, node.args[0]) if len(node.args) == 1 else node.args
    if _expr(start) is None or _expr(end) is None:
        return None
    return ndim - 1 - axis, _expr(end) - _expr(start), offset + _expr(start)


def _is_causal_relation(node, Tq, Tk) -> bool:
    """``node`` is ``kv ≤ q`` (or its ge/lt/gt spellings) over position indices such that key j is visible to query
    i exactly when j ≤ Tk − Tq + i: bottom-right causal attention, the op's own."""
    op = _RELATIONS.get(node.target) if node.op in ("call_function", "call_method") else None
    if op is None or len(node.args) != 2:
        return False
    a, b = (_position_index(x) if isinstance(x, fx.Node) else None for x in node.args)
    if a is None or b is None:
        return False
    small, big, slack = (a, b, 0) if op in ("le", "lt") else (b, a, 0)
    if op in ("lt", "gt"):
        slack = -1  # small < big  ⇔  small ≤ big − 1
    (ak, klen, koff), (aq, qlen, qoff) = small, big
    # key j (axis −1) at koff + j, query i (axis −2) at qoff + i: visible iff j ≤ i + (qoff − koff + slack)
    return ak == 0 and aq == 1 and _same(klen, Tk) and _same(qlen, Tq) and _same(qoff - koff + slack, Tk - Tq)


def analyse_mask(site: AttentionSite) -> MaskPlan:
    """Read the graph that builds ``site.attn_mask``. Under dynamo, transformers (5.17 at least; `masking_utils.
    sdpa_mask`) materialises a [B, 1, Tq, Tk] mask (``kv_idx <= q_idx``, AND the padding mask indexed per key) that
    the NSA op does not need, since it is causal by construction. When the mask is provably causal attention AND terms that depend on the key alone, the
    rewrite passes only those terms (or nothing), so the Tq × Tk mask is never built (16 GiB of bool at 128K tokens)
    and the kernels run without a run-time check. Anything else is ``"opaque"``: passed whole and checked at run
    time (`kernels.nsa.key_padding`)."""
    if site.attn_mask is None:
        return MaskPlan("")
    if not isinstance(site.attn_mask, fx.Node):
        return MaskPlan("opaque", why="not a graph value")
    q, k = _val(site.q), _val(site.k)
    if q is None or k is None:
        return MaskPlan("opaque", why="no shape information on q/k")
    Tq, Tk = _expr(q.shape[2]), _expr(k.shape[2])
    root = _unwrap(site.attn_mask)
    terms, frontier, causal, keys = [], [root], False, []
    while frontier:
        n = _unwrap(frontier.pop())
        if isinstance(n, fx.Node) and n.op in ("call_function", "call_method") and n.target in _AND \
                and len(n.args) == 2 and all(isinstance(a, fx.Node) and _val(a) is not None
                                             and _val(a).dtype == torch.bool for a in n.args):
            frontier.extend(n.args)
            continue
        terms.append(n)
    for t in terms:
        v = _val(t)
        if not isinstance(t, fx.Node) or v is None:
            return MaskPlan("opaque", why=f"mask term {t} has no shape information")
        if _target_is(t, {"new_ones", torch.ones_like, "ones_like"}) and v.dtype == torch.bool:
            continue  # transformers starts its AND chain from a True scalar
        if _is_causal_relation(t, Tq, Tk):
            causal = True
            continue
        if v.dtype == torch.bool and (v.dim() < 2 or v.shape[-2] == 1) and (v.dim() < 3 or v.shape[-3] == 1):
            keys.append(t)  # one value per (batch, key): broadcasts over heads and queries
            continue
        return MaskPlan("opaque", why=f"mask term {t.name} is neither causal nor per key")
    if not causal:
        return MaskPlan("opaque", why="no causal term found")
    return MaskPlan("causal+keys", tuple(keys)) if keys else MaskPlan("causal")
