"""``livegen bench --profile``: where a batch's time goes, from torch's profiler.

For each (variant, size, batch) the engine renders ``iters`` more batches under
``torch.profiler`` (on the calling thread: the profiler records CPU ops only on the thread that
started it, while CUPTI records every GPU kernel). The report gives, per batch:

- on CUDA, the summed GPU time of the kernels (and memory copies), split into categories by
  kernel name (convolution, GEMM, attention, normalization, compiled Triton kernels, layout
  transforms, JPEG, random numbers, everything else), the number of kernels, and the top kernels;
  on a CPU, the ops' self time split the same way (a smoke check of the tooling);
- the engine's own regions (``livegen.unet``, ``livegen.vae_decode``, …; ``fastpath.region``) when the
  batch ran eagerly. A CUDA graph replays without running the Python code, so graph rows have
  categories but no regions.

The timed rows stay the numbers that count: profiling slows the host side (each op is recorded),
so wall times under the profiler are not reported.

For torch.compile's Triton kernels the report also gives the bytes each moves and so the bandwidth
it reached: ``LaunchBytes`` records, while the row's first call compiles and captures its shape,
each launch's tensor arguments (inductor's own measure, ``get_num_bytes``: every input and output
once, in-place ones twice); the profile's time per kernel divides them. A graph replay launches
nothing from Python, so this needs the first call, not the profiled ones.
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from livegen.engine.fastpath import REGIONS

# Kernel (or CPU op) name fragments, lower case, first match wins. Order matters: cuDNN's
# convolution kernels contain "gemm" ("..._fprop_implicit_gemm_..."), Triton kernels any word.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("compiled (triton)", ("triton",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "scaled_dot_product")),
    # cuDNN's runtime-fusion kernels ("cudnn_generated_..."): here only its attention (matched above)
    # and its fused convolutions (engine/tiny_vae.py) run through them.
    ("convolution", ("conv2d", "convolution", "convolve", "conv_", "fprop", "winograd", "dgrad", "wgrad", "cudnn_gen")),
    ("layout (nchw<->nhwc)", ("nchwtonhwc", "nhwctonchw")),
    # PyTorch's copies between tensors of other strides or dtypes (``x.contiguous()``, ``.to()``,
    # channels_last <-> contiguous): kernels templated on ``direct_copy_kernel_cuda``.
    ("copies (layout / dtype)", ("copy_kernel",)),
    ("random", ("philox", "curand", "normal_", "randn", "distribution")),  # before "norm": "normal_kernel"
    ("normalization", ("norm", "moments", "fusedparams", "welford")),
    ("gemm", ("gemm", "nvjet", "cutlass", "cublas", "s16816", "s1688", "wgmma", "xmma", "aten::mm", "addmm", "bmm")),
    ("memcpy / memset", ("memcpy", "memset", "aten::copy_")),
    ("jpeg", ("jpeg", "huffman", "dct")),
)
OTHER = "elementwise / other"


# PyTorch's generic elementwise launchers: the functor they run, named further in, says what the
# kernel does (``kernel_label``).
_GENERIC = frozenset(
    ("elementwise_kernel", "vectorized_elementwise_kernel", "unrolled_elementwise_kernel", "gpu_kernel_impl",
     "gpu_kernel_impl_nocast", "gpu_kernel", "launch_legacy_kernel", "TensorIteratorBase", "reduce_kernel",
     "index_elementwise_kernel")
)  # fmt: skip
_NATIVE_NAME = re.compile(r"at::native::(?:\(anonymous namespace\)::|[A-Za-z_]\w*::)*([A-Za-z_]\w*)")
LABEL_WIDTH = 90


def kernel_label(name: str, width: int = LABEL_WIDTH) -> str:
    """A kernel's name short enough for a table that still says what it runs: a long PyTorch
    elementwise kernel (``elementwise_kernel<128, 4, gpu_kernel_impl_nocast<direct_copy_kernel_cuda
    ...``, hundreds of characters of templates) becomes ``elementwise_kernel [direct_copy_kernel_cuda]``;
    other long names are cut at ``width``."""
    if len(name) <= width:
        return name
    found = _NATIVE_NAME.findall(name)
    specific = list(dict.fromkeys(n for n in found if n not in _GENERIC))
    if found and specific:
        return f"{found[0]} [{', '.join(specific)}]"[: max(width, 120)]
    return name[:width]


def kernel_category(name: str) -> str:
    low = name.lower()
    for category, fragments in CATEGORIES:
        if any(f in low for f in fragments):
            return category
    return OTHER


@dataclass(frozen=True)
class Event:
    """What the summary needs of a profiler event: name, where it ran, its own time in µs."""

    name: str
    on_device: bool  # a GPU kernel / copy / annotation (True) or a CPU op or range (False)
    self_us: float  # device: duration; CPU: self time (children excluded)
    total_us: float  # device: duration; CPU: inclusive time


@dataclass
class ProfileSummary:
    """Per batch (means over the profiled batches), in milliseconds."""

    where: str  # "gpu kernels" or "cpu ops"
    batches: int
    total_ms: float
    ops: float  # kernels (GPU) or ops (CPU) per batch
    by_category: dict[str, float] = field(default_factory=dict)
    by_region: dict[str, float] = field(default_factory=dict)
    # (name, ms, calls, GB or None) per batch: GB for compiled kernels whose launches were recorded
    top: list[tuple[str, float, float, float | None]] = field(default_factory=list)
    # Every compiled (Triton) kernel the same way, slowest first; empty without recorded launches.
    triton: list[tuple[str, float, float, float | None]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "batches": self.batches,
            "total_ms": self.total_ms,
            "ops_per_batch": self.ops,
            "by_category_ms": self.by_category,
            "by_region_ms": self.by_region,
            "top_ms": [list(t) for t in self.top],
            "triton_kernels": [list(t) for t in self.triton],
        }


class LaunchBytes:
    """Bytes per launch of each compiled Triton kernel, by kernel name (``recording``)."""

    def __init__(self) -> None:
        self._bytes: dict[str, float] = defaultdict(float)
        self._launches: dict[str, int] = defaultdict(int)

    def add(self, name: str, nbytes: float) -> None:
        self._bytes[name] += nbytes
        self._launches[name] += 1

    def per_launch(self) -> dict[str, float]:
        """Mean bytes per launch. One name may be several kernels (each compiled graph numbers its
        own), each launched as often per batch as when recorded: the mean times the profile's
        launches per batch is still the batch's bytes."""
        return {name: self._bytes[name] / self._launches[name] for name in self._bytes}

    @contextlib.contextmanager
    def recording(self, kernel_class: Any = None) -> Iterator[bool]:
        """While inside, each launch of a kernel inductor compiled (``CachingAutotuner.run``, on any
        thread) is recorded before it runs, with the bytes inductor's own bandwidth profiler counts
        (``get_num_bytes``: each tensor argument once, in-place ones twice; whole buffers, so a
        kernel that reads a slice of one counts high). Yields False, recording nothing, where
        inductor's Triton runtime cannot be imported. A failure to count never stops a launch."""
        from torch._inductor.runtime.runtime_utils import get_num_bytes

        if kernel_class is None:
            try:
                from torch._inductor.runtime.triton_heuristics import CachingAutotuner
            except Exception:  # noqa: BLE001 - no Triton runtime (CPU builds): nothing to record
                yield False
                return
            kernel_class = CachingAutotuner
        original = kernel_class.run

        def run(kernel: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                meta = kernel.inductor_meta
                name = meta.get("kernel_name") or kernel.fn.__name__
                in_out = sum(1 for a in meta.get("mutated_arg_names", ()) if a.startswith("in_out_ptr"))
                self.add(name, get_num_bytes(*args, num_in_out_args=in_out))
            except Exception:  # noqa: BLE001, S110 - counting is optional, the launch is not
                pass
            return original(kernel, *args, **kwargs)

        kernel_class.run = run
        try:
            yield True
        finally:
            kernel_class.run = original


def summarize(
    events: Iterable[Event],
    batches: int,
    device: bool,
    top: int = 10,
    bytes_per_launch: Mapping[str, float] | None = None,
) -> ProfileSummary:
    """Aggregate one profile of ``batches`` batches. ``device``: count GPU events (True) or CPU
    ops (False). Regions are device annotations on a GPU, CPU ranges on a CPU. The top kernels
    come with their calls per batch: one compiled kernel serves every layer of the same shape.
    ``bytes_per_launch`` (``LaunchBytes.per_launch``) adds the GB per batch of the kernels it
    names, so their time says how near the memory bandwidth they run."""
    per_category: dict[str, float] = defaultdict(float)
    per_region: dict[str, float] = defaultdict(float)
    per_name: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    count = 0
    for e in events:
        if e.on_device != device:
            continue
        if e.name in REGIONS:
            per_region[_short(e.name)] += e.total_us
            continue
        if not device and not e.name.startswith("aten::"):
            continue  # CPU: only the ops (not python ranges, profiler bookkeeping)
        count += 1
        per_category[kernel_category(e.name)] += e.self_us
        per_name[e.name] += e.self_us
        calls[e.name] += 1
    n = max(batches, 1)
    ms = {k: v / 1e3 / n for k, v in per_category.items()}
    known = bytes_per_launch or {}

    def row(name: str, us: float, label: str) -> tuple[str, float, float, float | None]:
        per_launch = known.get(name)
        gb = per_launch * calls[name] / n / 1e9 if per_launch is not None else None
        return (label, us / 1e3 / n, calls[name] / n, gb)

    slowest = sorted(per_name.items(), key=lambda kv: -kv[1])
    return ProfileSummary(
        where="gpu kernels" if device else "cpu ops",
        batches=batches,
        total_ms=sum(ms.values()),
        ops=count / n,
        by_category=dict(sorted(ms.items(), key=lambda kv: -kv[1])),
        by_region={short: per_region[short] / 1e3 / n for short in map(_short, REGIONS) if short in per_region},
        top=[row(name, us, kernel_label(name)) for name, us in slowest[:top]],
        triton=[row(name, us, name) for name, us in slowest if known and kernel_category(name) == "compiled (triton)"],
    )


def _short(region_name: str) -> str:
    return region_name.removeprefix("livegen.")


def _events(prof: torch.profiler.profile) -> Iterator[Event]:
    for e in prof.events():
        on_device = e.device_type != torch.autograd.DeviceType.CPU
        if on_device:
            us = float(e.time_range.elapsed_us())
            yield Event(e.name, True, us, us)
        else:
            yield Event(e.name, False, float(e.self_cpu_time_total), float(e.cpu_time_total))


def profile_batches(
    run: Callable[[], Any], batches: int, cuda: bool, bytes_per_launch: Mapping[str, float] | None = None
) -> ProfileSummary:
    """Run ``run`` (one batch, on this thread) ``batches`` times under the profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(batches):
            run()
        if cuda:
            torch.cuda.synchronize()
    return summarize(_events(prof), batches, device=cuda, bytes_per_launch=bytes_per_launch)


def format_profile(label: str, p: dict[str, Any], wall_ms: float | None = None) -> list[str]:
    """Lines for the bench table: one profile as a small breakdown."""
    if "error" in p:
        return [f"profile {label}: failed ({p['error']})"]
    total = p["total_ms"]
    unit = "kernels" if p["where"] == "gpu kernels" else "ops"
    head = f"profile {label}: {p['where']} {total:.2f} ms/batch, {p['ops_per_batch']:.0f} {unit} per batch"
    if wall_ms is not None:
        head += f" (timed wall {wall_ms:.2f} ms/batch"
        if p["where"] == "gpu kernels":
            head += f": {max(0.0, wall_ms - total):.2f} ms not covered by kernels"
        head += ")"
    lines = [head]
    cats = ", ".join(f"{k} {v:.2f} ({v / total:.0%})" for k, v in p["by_category_ms"].items() if total > 0)
    lines.append(f"    by category: {cats or '-'}")
    if p["by_region_ms"]:
        lines.append("    by region: " + ", ".join(f"{k} {v:.2f}" for k, v in p["by_region_ms"].items()))
    triton = p["triton_kernels"]
    counted = [(ms, gb) for _, ms, _, gb in triton if gb is not None]
    if counted:
        ms_sum, gb_sum = sum(ms for ms, _ in counted), sum(gb for _, gb in counted)
        lines.append(
            f"    compiled kernels: {gb_sum:.2f} GB per batch in {ms_sum:.2f} ms, {_tb_per_s(gb_sum, ms_sum)} "
            f"({len(counted)} of {len(triton)} kernels counted)"
        )
    for name, ms, calls, gb in p["top_ms"]:
        moved = f"  {gb:.3f} GB, {_tb_per_s(gb, ms)}" if gb is not None else ""
        count = f"{calls:5.0f}" if calls == int(calls) else f"{calls:5.1f}"  # fractional: not in every batch
        lines.append(f"    {ms:8.3f} ms  {count} x {ms / calls:.3f} ms{moved}  {name}")
    return lines


def _tb_per_s(gb: float, ms: float) -> str:
    return f"{gb / ms:.2f} TB/s" if ms > 0 else "-"
