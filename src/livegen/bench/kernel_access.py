"""How well inductor's generated Triton kernels use memory sectors, read from their source.

Input: the Python wrapper module inductor writes for a compiled graph (``output_code.py``, what
``scripts/gpu-bench`` brings back in ``inductor-code.tar.xz``, or what
``benchmarks/inductor_codegen.py`` generates without a GPU). For every kernel launch in its
``call`` function, every ``tl.load``/``tl.store`` whose address is plain index arithmetic is
evaluated for 32 consecutive values of each of the kernel's block axes (one warp's lanes),
and its **sector efficiency** is the bytes those lanes use over the 32-byte sectors they touch,
along the best axis (Triton lays each access out along the axis its address is contiguous in).
An element per 2-byte lane, each in its own sector, is 1/16. An axis shorter than a warp is not
read along (the lanes would wrap onto the next row, by block sizes chosen at run time), so such a
launch can only be counted too wasteful; the report says by how much at most.

Per launch: the bytes the full-size accesses move (iterations x element size) and the sector
bytes they cost (bytes / efficiency). Broadcast operands (a bias, a group's mean: few distinct
addresses over a sample of the iteration space) and indirect addresses (``tmp`` indices) are
left out. Static, not timed: a lower bound on traffic and a pointer to the kernels that waste
it, to be set beside a profile's kernel times.

    python -m livegen.bench.kernel_access output_code.py [--top 15] [--sym s26=16] [--skip softmax]
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_KERNEL = re.compile(r"^(triton_\w+) = async_compile\.triton\('\w+', '''\n(.*?)''', device_str='\w+'\)", re.S | re.M)
_SIGNATURE = re.compile(r"'signature': \{(.*?)\}")
_DEF = re.compile(r"^def \w+\((.*?)\):", re.M)
_INDEX = re.compile(r"^\s+((?:x|y|z|r0_|r1_)\w*) = (.+)$", re.M)
_ACCESS = re.compile(r"tl\.(load|store)\((\w+) \+ \((.*?)\), ")
_LAUNCH = re.compile(r"^\s+(triton_\w+)\.run\((.*), stream=\w+\)$")
_ASSIGN = re.compile(r"^\s+(\w+) = (.+)$", re.M)
ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8, "i1": 1, "i8": 1, "u8": 1, "i16": 2, "i32": 4, "i64": 8}
LANES, SECTOR, SAMPLE = 32, 32, 4096
_AXES = ("z", "y", "x", "r0_", "r1_")  # outer to inner, as inductor names them


@dataclass
class Access:
    kind: str  # "load" | "store"
    pointer: str
    element_bytes: int
    efficiency: float | None  # None: an indirect address, not evaluated
    full_size: bool  # one element per iteration (not a broadcast operand)


@dataclass
class Launch:
    kernel: str
    numels: dict[str, int]  # block axis -> extent
    accesses: list[Access] = field(default_factory=list)

    @property
    def iterations(self) -> int:
        return int(np.prod(list(self.numels.values()))) if self.numels else 0

    def bytes(self) -> tuple[float, float]:
        """(bytes the full-size accesses move, sector bytes they cost)."""
        useful = cost = 0.0
        for a in self.accesses:
            if a.full_size and a.efficiency:
                moved = self.iterations * a.element_bytes
                useful += moved
                cost += moved / a.efficiency
        return useful, cost


@dataclass
class Kernel:
    name: str
    params: list[str]
    element_bytes: dict[str, int]
    axes: list[str]
    index_lines: list[tuple[str, str]]
    accesses: list[tuple[str, str, str]]  # (kind, pointer, address expression)


def parse_kernels(source: str) -> dict[str, Kernel]:
    kernels = {}
    for name, body in _KERNEL.findall(source):
        signature = _SIGNATURE.search(body)
        types = dict(re.findall(r"'(\w+)': '\*?(\w+)'", signature.group(1))) if signature else {}
        code = body[body.index("@triton.jit") :] if "@triton.jit" in body else body
        header = _DEF.search(code)
        params = [p.split(":")[0].strip() for p in header.group(1).split(",")] if header else []
        axes = [a for a in _AXES if f"{a}index" in code]
        kernels[name] = Kernel(
            name=name,
            params=params,
            element_bytes={p: ELEMENT_BYTES.get(t, 2) for p, t in types.items()},
            axes=axes,
            index_lines=_INDEX.findall(code),
            accesses=_ACCESS.findall(code),
        )
    return kernels


def _eval(expr: str, env: dict[str, Any]) -> Any:
    return eval(compile(ast.parse(expr, mode="eval"), "<index>", "eval"), {"__builtins__": {}}, env)


def _addresses(kernel: Kernel, expr: str, values: dict[str, np.ndarray], scalars: dict[str, int]) -> np.ndarray:
    env: dict[str, Any] = dict(scalars)
    for axis in kernel.axes:
        env[f"{axis}index"] = values[axis]
    for var, rhs in kernel.index_lines:
        if var.endswith(("offset", "base", "mask", "numel")) or "tl." in rhs:
            continue
        try:
            env[var] = _eval(rhs, env)
        except Exception:  # noqa: S112 (a line this model does not follow: its users are skipped below)
            continue
    return np.asarray(_eval(expr, env), dtype=np.int64)


def analyze(kernel: Kernel, numels: dict[str, int], scalars: dict[str, int], seed: int = 0) -> Launch:
    rng = np.random.default_rng(seed)
    launch = Launch(kernel.name, numels)
    for kind, pointer, expr in kernel.accesses:
        size = kernel.element_bytes.get(pointer, 2)
        if "tmp" in expr:
            launch.accesses.append(Access(kind, pointer, size, None, False))
            continue
        try:
            sample = {a: rng.integers(0, max(1, numels.get(a, 1)), SAMPLE) for a in kernel.axes}
            distinct = len(np.unique(_addresses(kernel, expr, sample, scalars)))
            best = 0.0
            for axis in kernel.axes:
                if numels.get(axis, 1) < LANES:
                    continue
                effs = []
                for _ in range(4):
                    base = {
                        a: int(rng.integers(0, max(1, numels.get(a, 1) - LANES))) // LANES * LANES for a in kernel.axes
                    }
                    lanes = {a: np.full(LANES, base[a]) for a in kernel.axes}
                    lanes[axis] = base[axis] + np.arange(LANES)
                    addr = _addresses(kernel, expr, lanes, scalars) * size
                    used = len(np.unique(addr)) * size
                    effs.append(used / (len(np.unique(addr // SECTOR)) * SECTOR))
                best = max(best, float(np.mean(effs)))
        except Exception:  # an address this model cannot evaluate: reported, not counted
            launch.accesses.append(Access(kind, pointer, size, None, False))
            continue
        full = distinct >= SAMPLE // 2 and not (kind == "store" and "r0_" in kernel.axes and "r0_" not in expr)
        launch.accesses.append(Access(kind, pointer, size, best or None, full))
    return launch


def launches(source: str, sizes: dict[str, int], skip: tuple[str, ...] = ()) -> Iterator[Launch]:
    """Every kernel launch in the wrapper's ``call``, in order, analyzed. ``sizes``: values for
    the graph's symbols (a dynamic batch's ``s26``, say)."""
    kernels = parse_kernels(source)
    env: dict[str, Any] = dict(sizes)
    call = source[source.find("def call(") :] or source
    for line in call.splitlines():
        assign = _ASSIGN.match(line)
        if assign and assign.group(1).endswith("numel"):
            try:
                env[assign.group(1)] = int(_eval(assign.group(2), env))
            except Exception:  # noqa: S112
                continue
        launch = _LAUNCH.match(line)
        if not launch or launch.group(1) not in kernels or any(s in launch.group(1) for s in skip):
            continue
        kernel = kernels[launch.group(1)]
        args = [a.strip() for a in launch.group(2).split(",")]
        scalars: dict[str, int] = {}
        for param, arg in zip(kernel.params, args, strict=False):
            try:  # sizes and symbols evaluate; buffers (buf1, arg0_1) do not
                scalars[param] = int(_eval(arg, env))
            except Exception:  # noqa: S112
                continue
        numels = {a: scalars[f"{a}numel"] for a in kernel.axes if f"{a}numel" in scalars}
        yield analyze(kernel, numels, scalars)


def report(path: str, sizes: dict[str, int], top: int, skip: tuple[str, ...]) -> str:
    with open(path) as f:
        rows = [(r, *r.bytes()) for r in launches(f.read(), sizes, skip)]
    useful = sum(moved for _, moved, _ in rows)
    cost = sum(sectors for _, _, sectors in rows)
    lines = [f"{path}: {len(rows)} launches, full-size accesses move {useful / 1e9:.2f} GB, "
             f"cost {cost / 1e9:.2f} GB of sectors ({cost - useful:+.2e} B over)"]  # fmt: skip
    # An axis shorter than a warp is not read along (Triton would wrap the warp's lanes onto the
    # next row; how depends on the block sizes chosen at run time): its launches are read along
    # a longer axis, which can only undercount their efficiency. Their waste bounds the error.
    short = [(moved, sectors) for r, moved, sectors in rows if any(1 < n < LANES for n in r.numels.values())]
    moved, sectors = (sum(col) for col in zip(*short, strict=True)) if short else (0.0, 0.0)
    if (over := (sectors - moved) / 1e9) >= 0.0005:  # printed to the MB
        lines.append(f"  {len(short)} launches with an axis shorter than a warp: {sectors / 1e9:.3f} GB of sectors "
                     f"for {moved / 1e9:.3f} GB; the total is at most {over:.3f} GB high")  # fmt: skip
    rows.sort(key=lambda row: row[1] - row[2])
    for r, moved, sectors in rows[:top]:
        if sectors <= moved * 1.001:
            break
        effs = ", ".join(f"{a.kind} {a.pointer} {a.efficiency:.2f}" for a in r.accesses if a.full_size and a.efficiency)
        numels = "x".join(str(v) for v in r.numels.values())
        lines.append(f"  {sectors / 1e6:8.1f} MB of sectors for {moved / 1e6:7.1f} MB  {r.kernel}  [{numels}]  {effs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="inductor wrapper modules (output_code.py)")
    ap.add_argument("--top", type=int, default=15, help="launches listed, most sector bytes over first")
    ap.add_argument("--sym", action="append", default=[], help="a symbol's value, e.g. s26=16 (dynamic batch)")
    ap.add_argument("--batch", type=int, default=16, help="the value of any s<N> symbol not given by --sym")
    ap.add_argument("--skip", default="", help="comma-separated substrings of kernel names to leave out")
    args = ap.parse_args(argv)
    sizes = {f"s{i}": args.batch for i in range(200)}
    sizes.update({k: int(v) for k, v in (s.split("=") for s in args.sym)})
    skip = tuple(s for s in args.skip.split(",") if s)
    for path in args.paths:
        try:
            print(report(path, sizes, args.top, skip))
        except Exception as exc:  # one unreadable wrapper does not hide the others' reports
            print(f"{path}: not read ({type(exc).__name__}: {exc})")


if __name__ == "__main__":
    main(sys.argv[1:])
