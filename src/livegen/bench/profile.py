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
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
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
    top: list[tuple[str, float, float]] = field(default_factory=list)  # (name, ms, calls) per batch

    def as_dict(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "batches": self.batches,
            "total_ms": self.total_ms,
            "ops_per_batch": self.ops,
            "by_category_ms": self.by_category,
            "by_region_ms": self.by_region,
            "top_ms": [list(t) for t in self.top],
        }


def summarize(events: Iterable[Event], batches: int, device: bool, top: int = 10) -> ProfileSummary:
    """Aggregate one profile of ``batches`` batches. ``device``: count GPU events (True) or CPU
    ops (False). Regions are device annotations on a GPU, CPU ranges on a CPU. The top kernels
    come with their calls per batch: one compiled kernel serves every layer of the same shape,
    so its time per call, beside the layer's bytes, says how near the memory bandwidth it runs."""
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
    return ProfileSummary(
        where="gpu kernels" if device else "cpu ops",
        batches=batches,
        total_ms=sum(ms.values()),
        ops=count / n,
        by_category=dict(sorted(ms.items(), key=lambda kv: -kv[1])),
        by_region={short: per_region[short] / 1e3 / n for short in map(_short, REGIONS) if short in per_region},
        top=[
            (kernel_label(name), us / 1e3 / n, calls[name] / n)
            for name, us in sorted(per_name.items(), key=lambda kv: -kv[1])[:top]
        ],
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


def profile_batches(run: Callable[[], Any], batches: int, cuda: bool) -> ProfileSummary:
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
    return summarize(_events(prof), batches, device=cuda)


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
    for name, ms, calls in p["top_ms"]:
        lines.append(f"    {ms:8.3f} ms  {calls:5.0f} x {ms / calls:.3f} ms  {name}")
    return lines
