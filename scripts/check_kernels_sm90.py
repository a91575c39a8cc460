"""Compile every Triton kernel launch of the op for an H100 (sm_90) on a machine without a GPU, and check each
fits the chip: shared memory ≤ 232,448 bytes per block (the limit a launch fails on with ``OutOfResources``).

How: step 1 runs the Triton path on CPU under the interpreter over a grid of shapes (head dims 16 … 256, GQA
groups 1 … 16, fp16 / bf16 / fp32, prefill forward and backward, sparse decode) and records each launch (kernel,
argument types, constexprs, warps, stages); step 2, in a fresh process without the interpreter, compiles each
distinct launch with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (ptxas ships with the triton wheel) and
prints the ones over the limit. Exit status 1 when any is. It also reports, per kernel, the most registers per
thread and of local memory (spills) per launch (``cuobjdump --dump-resource-usage``, shipped with the wheel too);
``--spills`` lists every launch that spills.

    python scripts/check_kernels_sm90.py            # both steps, every shape of the grid (an hour or more)
    python scripts/check_kernels_sm90.py --quick    # head dim 256 only, where the limits bite (~10 min, 2 cores)
    python scripts/check_kernels_sm90.py --head-dims 128 --spills   # shape A's head dim, spilling launches

Compiled code generation here is Triton's of this machine's version (e.g. 3.9), not necessarily the GPU image's
(3.6): the figures are a close estimate, not the GPU's own. For the GPU image's code generation, compile with its
Triton (step 1 keeps this machine's, whose interpreter runs with today's numpy): ``pip install --no-deps --target
/tmp/t36 triton==3.6.0``, then add ``--triton-path /tmp/t36`` (twenty-fourth session: both versions spill in the
compression branch's forward loop at head dim 128 with 4 warps; removing the spill did not change its time on an
H100, BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMEM_LIMIT = 232448  # bytes of shared memory per block on an H100 (sm_90)


def record(path: str, quick: bool, head_dims: tuple[int, ...] | None = None) -> None:
    """Step 1 (under TRITON_INTERPRET=1): run the Triton path on small inputs and write the distinct launches."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    from nsa_compile.kernels import decode as dec
    from nsa_compile.kernels.nsa_triton import nsa_triton_backward, nsa_triton_forward

    seen: dict[str, dict] = {}
    run = InterpretedFunction.run

    def spy(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        sig, cst, div16 = {}, {}, []
        for name, val in list(zip(names, args)) + list(kwargs.items()):
            if name in ("num_warps", "num_stages"):
                continue
            if isinstance(val, torch.Tensor):
                sig[name] = "*" + {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                                   torch.int32: "i32", torch.int64: "i64", torch.int8: "i8",
                                   torch.bool: "i1"}[val.dtype]
                if val.data_ptr() % 16 == 0:
                    div16.append(name)
            elif name in kwargs or val is None or isinstance(val, str):
                sig[name], cst[name] = "constexpr", val
            elif isinstance(val, bool):
                sig[name] = "i1"
            elif isinstance(val, int):
                sig[name] = "i32" if -2**31 <= val < 2**31 else "i64"
                if val % 16 == 0:
                    div16.append(name)
            else:
                sig[name] = "fp32"
        # Triton specialises a launch on its pointers and integers divisible by 16 (vectorised, pipelined loads:
        # more shared memory); without these hints the offline build underestimates it (e.g. the by-key selection
        # forward: 64 KiB instead of 112)
        entry = dict(module=self.fn.__module__, name=self.fn.__name__, signature=sig, constexprs=cst,
                     divisible_by_16=div16, num_warps=kwargs.get("num_warps", 4),
                     num_stages=kwargs.get("num_stages", 3))
        seen.setdefault(json.dumps(entry, sort_keys=True, default=str), entry)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = spy
    dims = head_dims or ((256,) if quick else (16, 32, 64, 96, 128, 256))
    groups = ((1, 1), (2, 14)) if quick else ((1, 1), (2, 14), (1, 16))
    dtypes = (torch.float16, torch.float32) if quick else (torch.float16, torch.bfloat16, torch.float32)
    g = torch.Generator().manual_seed(0)
    # (l, d, l', n, w): stride = block; stride 1 (many compression blocks per selection block); selection blocks
    # of 64 (the videonsa preset) and 128 (the largest key chunk)
    configs = ((16, 16, 16, 2, 24), (8, 1, 16, 3, 12), (64, 64, 64, 2, 32), (32, 16, 128, 1, 32))
    for D in dims:
        for Hkv, Hq in groups:
            for dt in dtypes:
                for params in configs:
                    B, T = 1, 64
                    q = torch.randn(B, Hq, T, D, generator=g).to(dt)
                    k, v = (torch.randn(B, Hkv, T, D, generator=g).to(dt) for _ in range(2))
                    gates = torch.rand(B, Hq, T, 3, generator=g).to(dt)
                    vm = torch.ones(B, T, dtype=torch.bool)
                    vm[:, :4] = False
                    # the forward keeping its state for the training op's backward (selection by key segment),
                    # then both backwards: with that state, and recomputing
                    ids = torch.full((B, Hkv, T, params[3]), -1, dtype=torch.int32)
                    lse = torch.zeros(B, Hq, T, 3)
                    out = nsa_triton_forward(q, k, v, gates, vm, D ** -0.5, *params, selected_out=ids,
                                             lse_out=lse)
                    go = torch.randn_like(q)
                    nsa_triton_backward(go, q, k, v, gates, vm, D ** -0.5, *params, selected=ids, lse=lse,
                                        out=out)
                    nsa_triton_backward(go, q, k, v, gates, vm, D ** -0.5, *params)
                    if D & (D - 1) == 0 and params[1] == params[0]:  # sparse decode: power-of-two head dims
                        l, d, ls, n, w = params
                        state = dec.build_decode_state(k, v, vm, l, d, ls)
                        kk = torch.cat([k, torch.randn(B, Hkv, 2, D, generator=g).to(dt)], 2)
                        vv = torch.cat([v, torch.randn(B, Hkv, 2, D, generator=g).to(dt)], 2)
                        dec.sparse_decode_triton(q[:, :, -2:], kk, vv, gates[:, :, -2:], state, D ** -0.5, n, w)
        print(f"head dim {D}: {len(seen)} distinct launches so far", flush=True)
    with open(path, "w") as f:
        json.dump(list(seen.values()), f)


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, bytes of stack: spills) of a cubin, from the wheel's ``cuobjdump`` ((-1, -1) when it
    cannot tell)."""
    import re

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        except OSError:
            return -1, -1
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def _compile_one(e: dict) -> tuple[str, str, int | None, str, tuple[int, int]]:
    """(kernel name, description, shared memory in bytes or None, error, (registers, spill bytes)) of one recorded
    launch built for sm_90."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(e["module"]), e["name"])
    names = kernel.arg_names
    sig = {n: e["signature"][n] for n in names if n in e["signature"]}
    cst = {(names.index(n),): v for n, v in e["constexprs"].items()}
    what = f"{e['name']} {e['constexprs']} warps {e['num_warps']} stages {e['num_stages']}"
    try:
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in e.get("divisible_by_16", ())}
        k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=cst, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=e["num_warps"], num_stages=e["num_stages"]))
    except Exception as exc:  # noqa: BLE001 -- a launch that does not compile is a finding too
        return e["name"], what, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", (-1, -1)
    return e["name"], what, k.metadata.shared, "", _resources(k.asm["cubin"])


def compile_all(path: str, workers: int, spills: bool = False) -> int:
    """Step 2 (no interpreter): compile each recorded launch for sm_90, printing at once those over the
    shared-memory limit or failing to compile (and with ``spills`` those that spill registers); then per kernel the
    largest shared memory, registers per thread and spill bytes of its launches."""
    from concurrent.futures import ProcessPoolExecutor

    launches = json.load(open(path))
    worst, bad = {}, 0
    with ProcessPoolExecutor(workers) as pool:
        for i, (name, what, smem, err, (regs, stack)) in enumerate(pool.map(_compile_one, launches)):
            if smem is None or smem > SMEM_LIMIT:
                bad += 1
                print("FINDING", what, err or f"{smem} bytes of shared memory > {SMEM_LIMIT}", flush=True)
            else:
                old = worst.get(name, (0, 0, 0))
                worst[name] = (max(old[0], smem), max(old[1], regs), max(old[2], stack))
            if spills and stack > 0:
                print("SPILLS", what, f"{regs} registers, {stack} bytes of stack", flush=True)
            if (i + 1) % 20 == 0:
                print(f"{i + 1}/{len(launches)} compiled", flush=True)
    print(f"{len(launches)} launches compiled for sm_90, {bad} findings; per kernel, the most shared memory "
          "(bytes), registers per thread and spill bytes of its launches:")
    for name, (smem, regs, stack) in sorted(worst.items()):
        print(f"  {name}: {smem} B shared, {regs} registers, {stack} B spilled")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="head dim 256 only")
    ap.add_argument("--head-dims", type=lambda x: tuple(int(d) for d in x.split(",")), help="e.g. 64,128")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compile processes")
    ap.add_argument("--launches", help="compile the launches recorded in this file (skip step 1)")
    ap.add_argument("--spills", action="store_true", help="also list every launch that spills registers")
    ap.add_argument("--triton-path", help="compile (step 2) with the Triton installed in this folder (pip --target), "
                    "e.g. the GPU image's version")
    ap.add_argument("--record", help=argparse.SUPPRESS)  # internal: step 1's output
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    if args.record:
        record(args.record, args.quick, args.head_dims)
        return 0
    if args.launches:
        if args.triton_path:
            sys.path.insert(0, args.triton_path)  # before anything imports triton
        return compile_all(args.launches, args.workers, args.spills)
    path = os.path.join(tempfile.mkdtemp(), "launches.json")
    step1 = [sys.executable, __file__, "--record", path] + (["--quick"] if args.quick else []) + (
        ["--head-dims", ",".join(map(str, args.head_dims))] if args.head_dims else [])
    subprocess.run(step1, check=True, env={**os.environ, "TRITON_INTERPRET": "1"})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    print(f"launches recorded in {path}", flush=True)
    return subprocess.run([sys.executable, __file__, "--launches", path, "--workers", str(args.workers)]
                          + (["--spills"] if args.spills else [])
                          + (["--triton-path", args.triton_path] if args.triton_path else []), env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
