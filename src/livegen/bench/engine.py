"""``livegen bench`` (engine mode): livegen's engine and stock diffusers, same work, same run.

For each batch size, livegen's worker gets ``batch`` requests at once (it renders them as one
batch and encodes each image to JPEG, which is what a user receives), and stock diffusers does
what its docs show: ``AutoPipelineFor{Text2Image,Image2Image}.from_pretrained`` in fp16 on a
GPU (with the checkpoint's fp16 files, where it has them; fp32 on a CPU), default VAE, a list
of ``batch`` prompts, PIL output. Warm-up runs are excluded from the timings and reported on
their own (time to the first image). Numbers from a CPU are a smoke check; the ones that count
come from a GPU with ``--weights random``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from livegen.bench import streamdiffusion
from livegen.bench.profile import LaunchBytes, format_profile, profile_batches
from livegen.engine import GenerationRequest, Priority, Task
from livegen.engine.pipelines import common
from livegen.engine.registry import resolve_source, spec_for
from livegen.engine.worker import STAGES, Worker, stage_summary
from livegen.settings import DEFAULT_REWRITES, Settings

PROMPT = "a photo of a red fox in the snow, detailed, 4k"


VARIANTS = ("default", "plain", "eager", "graph", "compile", "compile-ro")
MODIFIERS = (
    "bf16", "fp16", "fp32", "tiny-vae", "full-vae", "no-cl", "fuse-qkv", "tuned", "dyn-batch", "cudnn-bench",
    "sdpa-cudnn", "nhwc-gn", "split-geglu", "taesd-relu", "taesd-fold", "keep-cl", "no-text-graph", "fp8",
    "no-split-geglu", "no-taesd-relu", "no-taesd-fold", "no-keep-cl", "no-rewrites", "no-fp8-geglu",
)  # fmt: skip


# A modifier that sets one engine setting: (setting, value).
_ONE_SETTING: dict[str, tuple[str, Any]] = {
    "bf16": ("dtype", "bfloat16"),
    "fp16": ("dtype", "float16"),
    "fp32": ("dtype", "float32"),
    "no-cl": ("channels_last", False),
    "fuse-qkv": ("fuse_qkv", True),
    "tuned": ("compile_tuning", True),
    "dyn-batch": ("compile_dynamic_batch", True),
    "cudnn-bench": ("cudnn_benchmark", True),
    "sdpa-cudnn": ("sdpa_cudnn", True),
    "nhwc-gn": ("nhwc_group_norm", True),
    "split-geglu": ("split_geglu", True),
    "taesd-relu": ("tiny_vae_conv_relu", True),
    "taesd-fold": ("tiny_vae_fold_upsample", True),
    "keep-cl": ("keep_channels_last", True),
    "no-text-graph": ("text_encoder_graph", False),
    "fp8": ("fp8_linear", True),
    "no-split-geglu": ("split_geglu", False),
    "no-taesd-relu": ("tiny_vae_conv_relu", False),
    "no-taesd-fold": ("tiny_vae_fold_upsample", False),
    "no-keep-cl": ("keep_channels_last", False),
    "no-fp8-geglu": ("fp8_geglu_kernel", False),
}
# What each modifier sets: {setting: value}. The others: tiny-vae / full-vae.
_MODIFIER_SETTINGS: dict[str, dict[str, Any]] = {
    name: {setting: value} for name, (setting, value) in _ONE_SETTING.items()
}
_MODIFIER_SETTINGS["no-rewrites"] = dict.fromkeys(DEFAULT_REWRITES, False)  # the fast path before them


@dataclass(frozen=True)
class EngineBenchConfig:
    model: str
    task: str  # "t2i" | "i2i"
    size: int
    steps: int
    batches: tuple[int, ...]
    iters: int = 5
    strength: float = 0.5
    baseline: bool = True
    sizes: tuple[int, ...] = ()  # several sizes in one run (default: just ``size``)
    variants: tuple[str, ...] = ("default",)
    guidance_scale: float = 0.0
    profile: bool = False  # also profile each row (torch.profiler; see livegen.bench.profile)
    streamdiffusion: bool = False  # also time StreamDiffusion's torch pipeline (livegen.bench.streamdiffusion)
    # Every livegen batch with prompts not seen before (the prompt-embedding cache misses each time),
    # as a session whose prompt follows its user's typing; stock diffusers encodes its prompt every call anyway.
    new_prompts: bool = False

    def all_sizes(self) -> tuple[int, ...]:
        return self.sizes or (self.size,)


def variant_settings(settings: Settings, variant: str) -> Settings:
    """Engine settings for a variant: BASE[+MODIFIER...], e.g. ``graph``, ``graph+bf16``,
    ``eager+full-vae``, ``graph+no-cl`` (without channels_last), ``graph+fuse-qkv`` (fused attention
    projections), ``compile+tuned`` (inductor tuning flags), ``compile+dyn-batch`` (one compile for
    batches 2..16), ``graph+cudnn-bench`` (cuDNN times its
    convolution algorithms), ``graph+sdpa-cudnn`` (cuDNN's attention first), ``graph+nhwc-gn``
    (GroupNorms kept in channels_last), ``graph+split-geglu`` (GEGLU's halves projected apart),
    ``graph+taesd-relu`` / ``graph+taesd-fold`` (the tiny VAE's fused convolutions / folded upsampling),
    ``compile+keep-cl`` (activations kept channels_last: engine/layout.py), ``graph+no-text-graph``
    (new prompts encoded eagerly: engine/text_graph.py), ``compile+fp8`` (the UNet's transformer
    linears in float8: engine/fp8.py). split-geglu, taesd-relu, taesd-fold and keep-cl are on by default
    (session 22): ``graph+no-split-geglu`` and the like time the fast path without one, ``graph+no-rewrites``
    without all four.
    BASE: default (what ``livegen serve`` does on this device), plain
    (stock pipelines, no fast path), eager (fast path, no graph), graph (fast path + CUDA
    graphs), compile (torch.compile default mode inside CUDA graphs), compile-ro (torch.compile
    reduce-overhead, its own graphs)."""
    base, *mods = variant.split("+")
    if base not in VARIANTS or any(m not in MODIFIERS for m in mods):
        raise ValueError(f"unknown variant {variant!r}: BASE[+MOD] with BASE in {VARIANTS}, MOD in {MODIFIERS}")
    presets: dict[str, dict[str, Any]] = {
        "plain": {"fast_path": "off"},
        "eager": {"fast_path": "on", "cuda_graphs": False},
        "graph": {"fast_path": "on", "cuda_graphs": True},
        "compile": {"fast_path": "on", "cuda_graphs": True, "torch_compile": "default"},
        "compile-ro": {"fast_path": "on", "cuda_graphs": False, "torch_compile": "reduce-overhead"},
    }
    update = dict(presets.get(base, {}))
    for m in mods:
        if m in _MODIFIER_SETTINGS:
            update.update(_MODIFIER_SETTINGS[m])
        else:
            update["tiny_vae"] = m == "tiny-vae"
    return settings.model_copy(update=update)


@dataclass
class Row:
    task: str
    model: str
    size: int
    batch: int
    livegen_ms_per_img: float
    diffusers_ms_per_img: float | None
    variant: str = "default"
    first_call_ms: float | None = None  # the first batch at this shape: capture / compile included
    profile: dict[str, Any] | None = None  # with --profile: where a batch's time goes
    stages: dict[str, Any] | None = None  # the timed batches' stages in the worker (medians, ms per batch)
    # Two batches in the worker at a time, as under a server's steady load (the next batch's host
    # work overlaps this one's device work): ms per image between successive batches' results.
    pipelined_ms_per_img: float | None = None
    streamdiffusion_ms_per_img: float | None = None  # with --streamdiffusion: its torch pipeline, same work

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["livegen_img_per_s"] = 1000 / self.livegen_ms_per_img
        if self.pipelined_ms_per_img is not None:
            out["pipelined_img_per_s"] = 1000 / self.pipelined_ms_per_img
        if self.diffusers_ms_per_img is not None:
            out["diffusers_img_per_s"] = 1000 / self.diffusers_ms_per_img
            out["speedup"] = self.diffusers_ms_per_img / self.livegen_ms_per_img
        if self.streamdiffusion_ms_per_img is not None:
            out["streamdiffusion_img_per_s"] = 1000 / self.streamdiffusion_ms_per_img
            out["speedup_vs_streamdiffusion"] = self.streamdiffusion_ms_per_img / self.livegen_ms_per_img
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Mean seconds per call of ``fn`` over ``iters`` calls (after the caller's warm-up)."""
    _sync(device)
    started = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - started) / iters


def _input_image(size: int) -> Image.Image:
    img = Image.new("RGB", (size, size))
    img.putdata([((x * 7) % 256, (y * 3) % 256, 128) for y in range(size) for x in range(size)])
    return img


@dataclass
class Measured:
    """One side's results: warm-up facts and seconds per batch by (size, batch)."""

    warmup: dict[str, Any]
    per_batch: dict[tuple[int, int], float]
    first_call: dict[tuple[int, int], float] = dataclasses.field(default_factory=dict)
    profiles: dict[tuple[int, int], dict[str, Any]] = dataclasses.field(default_factory=dict)
    stages: dict[tuple[int, int], dict[str, Any]] = dataclasses.field(default_factory=dict)
    pipelined: dict[tuple[int, int], float] = dataclasses.field(default_factory=dict)  # s per batch


def _requests(config: EngineBenchConfig, size: int, batch: int, image: Image.Image | None) -> list[GenerationRequest]:
    task = Task.TEXT_TO_IMAGE if config.task == "t2i" else Task.IMAGE_TO_IMAGE
    return [
        GenerationRequest(
            model_id=config.model,
            task=task,
            prompt=PROMPT,
            width=size,
            height=size,
            num_inference_steps=config.steps,
            guidance_scale=config.guidance_scale,
            seed=i,
            strength=config.strength,
            image=image if task is Task.IMAGE_TO_IMAGE else None,
            priority=Priority.REALTIME,
        )
        for i in range(batch)
    ]


def bench_livegen(settings: Settings, config: EngineBenchConfig, variant: str = "default") -> Measured:
    """One engine variant: load, then per (size, batch) a first call (captures/compiles that
    shape; reported apart) and ``iters`` timed calls."""
    # No warm-up at start: the first call at each shape is the bench's own warm-up (timed and
    # reported apart), so torch.compile must compile the shapes it meets then (compile_on_demand),
    # not treat them as shapes first seen after warm-up and run them uncompiled.
    settings = variant_settings(settings, variant).model_copy(
        update={
            "models": [config.model],
            "max_batch_size": max(config.batches),
            "batch_fill": 0.0,  # a batch of 3 runs as one padded to 4, as asked, not cut to 2 + 1
            "warmup_sizes": [],
            "compile_on_demand": True,
        }
    )
    cuda = _cuda(settings)
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    measured = Measured(warmup={}, per_batch={})
    graphs_before = _dynamo_graphs()
    started = time.perf_counter()
    with Worker.start(settings) as worker:
        worker.startup.result()
        loaded = time.perf_counter()

        seen: list[tuple[float, float]] = []  # each timed batch: submitted, all results in hand
        takes = itertools.count()

        def fresh(requests: list[GenerationRequest]) -> list[GenerationRequest]:
            """The requests to submit: as made, or with --new-prompts each with a prompt never seen."""
            if not config.new_prompts:
                return requests
            return [dataclasses.replace(r, prompt=f"{r.prompt}, take {next(takes)}") for r in requests]

        def run(requests: list[GenerationRequest]) -> None:
            t0 = time.perf_counter()
            for f in worker.submit_all(fresh(requests)):  # all at once: one batch of exactly these
                f.result()
            seen.append((t0, time.perf_counter()))

        for size in config.all_sizes():
            image = _input_image(size) if config.task == "i2i" else None
            for batch in config.batches:
                requests = _requests(config, size, batch, image)
                # With --profile: the compiled Triton kernels' bytes as the first call launches them
                # (a CPU compiles C++ kernels instead and records none).
                launches = LaunchBytes()
                recording = launches.recording() if config.profile else contextlib.nullcontext()
                t0 = time.perf_counter()
                with recording:
                    run(requests)  # warm-up at this shape
                measured.first_call[size, batch] = time.perf_counter() - t0
                worker.stages.clear()
                seen.clear()
                measured.per_batch[size, batch] = _timed(functools.partial(run, requests), worker.device, config.iters)
                measured.stages[size, batch] = _stages(list(worker.stages), seen)
                measured.pipelined[size, batch] = _pipelined(worker, requests, config.iters, fresh)
                if config.profile:
                    try:
                        summary = profile_batches(
                            functools.partial(worker.run_here, requests),
                            config.iters,
                            worker.device.type == "cuda",
                            bytes_per_launch=launches.per_launch(),
                        )
                        measured.profiles[size, batch] = summary.as_dict()
                    except Exception as exc:  # noqa: BLE001 - the profiler (CUPTI) is optional; keep the timings
                        measured.profiles[size, batch] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        status = worker.status()
        measured.warmup = {
            "load_s": loaded - started,
            "first_image_s": min(measured.first_call.values()),
            "fast_path": status.get("fast_path", {}).get(config.model),
            "dtype": status["dtype"],
        }
        if settings.torch_compile != "off":
            # Every graph dynamo compiled, recompiles included: a shape the fast path counts as
            # reusing a dynamic-batch compile ("compile_reused_shapes") but that failed a guard
            # shows up here, and TORCH_LOGS=recompiles says which guard.
            measured.warmup["dynamo_graphs"] = _dynamo_graphs() - graphs_before
            if settings.inductor_options:
                measured.warmup["inductor_options"] = settings.inductor_options
        if cuda:
            measured.warmup["vram_model_bytes"] = status["vram_bytes_by_model"].get(config.model)
            measured.warmup["vram_peak_bytes"] = torch.cuda.max_memory_allocated()
    return measured


def _dynamo_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (each compile and recompile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


PIPELINE_DEPTH = 2  # batches submitted and not yet back: the worker's two batch slots


def _pipelined(
    worker: Worker,
    requests: list[GenerationRequest],
    iters: int,
    fresh: Callable[[list[GenerationRequest]], list[GenerationRequest]] = lambda r: r,
) -> float:
    """Seconds per batch with ``PIPELINE_DEPTH`` batches in the worker at a time, as under a
    server's steady load: the next batch is formed and launched while this one runs, and its
    results are encoded while the next runs. Timed from the first batch's results to the last's
    (``iters`` + 1 batches), so the pipeline's filling is left out."""
    # Batches of exactly this size: two of them waiting at once must not be merged into one.
    full = worker.settings
    worker.settings = full.model_copy(update={"max_batch_size": len(requests)})
    try:
        return _pipelined_run(worker, requests, iters, fresh)
    finally:
        worker.settings = full


def _pipelined_run(
    worker: Worker,
    requests: list[GenerationRequest],
    iters: int,
    fresh: Callable[[list[GenerationRequest]], list[GenerationRequest]],
) -> float:
    in_flight: list[list[Any]] = []
    done: list[float] = []
    for _ in range(iters + 1):
        in_flight.append(worker.submit_all(fresh(requests)))
        if len(in_flight) == PIPELINE_DEPTH:
            for f in in_flight.pop(0):
                f.result()
            done.append(time.perf_counter())
    for futures in in_flight:
        for f in futures:
            f.result()
        done.append(time.perf_counter())
    return (done[-1] - done[0]) / (len(done) - 1)


def _stages(records: list[Any], seen: list[tuple[float, float]]) -> dict[str, Any]:
    """The worker's stage medians for the timed batches (one worker batch per bench batch), the
    hand-back (the last future resolved -> the bench's thread has every result) and the batch's
    wall time, submitted -> results in hand (median, so that the stages add up to about it)."""
    out = stage_summary(records)
    if seen:
        out["wall_ms"] = round(statistics.median(end - start for start, end in seen) * 1e3, 3)
    if records and len(records) == len(seen):
        out["handback_ms"] = round(
            statistics.median(end - r.resolved_at for r, (_, end) in zip(records, seen, strict=True)) * 1e3, 3
        )
    return out


def _cuda(settings: Settings) -> bool:
    return settings.device != "cpu" and torch.cuda.is_available()


def bench_diffusers(settings: Settings, config: EngineBenchConfig) -> Measured:
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

    spec = spec_for(config.model)
    device = torch.device("cuda" if _cuda(settings) else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    source = resolve_source(spec.base_repo, settings)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    cls = AutoPipelineForText2Image if config.task == "t2i" else AutoPipelineForImage2Image
    # As the model cards load it: float16 with the checkpoint's fp16 files (variant="fp16") where it has them.
    pipe = common.from_pretrained(cls, source, dtype=dtype).to(device)
    if spec.lora_repo is not None:
        from diffusers import LCMScheduler

        from livegen.engine.pipelines.lcm import lora_file

        lora = resolve_source(spec.lora_repo, settings)
        pipe.load_lora_weights(lora, **lora_file(lora))
        pipe.fuse_lora()
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()

    def run_batch(size: int, batch: int, image: Image.Image) -> None:
        kwargs: dict[str, Any] = {
            "num_inference_steps": config.steps,
            "guidance_scale": config.guidance_scale,
            "output_type": "pil",
        }
        if config.task == "t2i":
            kwargs.update(height=size, width=size)
        else:
            kwargs.update(image=[image] * batch, strength=config.strength)
        pipe(prompt=[PROMPT] * batch, **kwargs)

    measured = Measured(warmup={}, per_batch={})
    for size in config.all_sizes():
        image = _input_image(size)
        for batch in config.batches:
            t0 = time.perf_counter()
            run_batch(size, batch, image)
            measured.first_call[size, batch] = time.perf_counter() - t0
            measured.per_batch[size, batch] = _timed(
                functools.partial(run_batch, size, batch, image), device, config.iters
            )
    measured.warmup = {"load_s": loaded - started, "first_image_s": min(measured.first_call.values())}
    if device.type == "cuda":
        measured.warmup["vram_peak_bytes"] = torch.cuda.max_memory_allocated()
    return measured


def run_engine_bench(settings: Settings, config: EngineBenchConfig) -> dict[str, Any]:
    for v in config.variants:
        variant_settings(settings, v)  # refuse a typo before minutes of loading
    if config.streamdiffusion:
        streamdiffusion.check(config.model)
    ours = {v: bench_livegen(settings, config, v) for v in config.variants}
    theirs = bench_diffusers(settings, config) if config.baseline else None
    stream = streamdiffusion.bench_streamdiffusion(settings, config) if config.streamdiffusion else None
    rows = [
        Row(
            config.task,
            config.model,
            size,
            b,
            m.per_batch[size, b] / b * 1e3,
            theirs.per_batch[size, b] / b * 1e3 if theirs else None,
            variant=v,
            first_call_ms=m.first_call[size, b] * 1e3,
            profile=m.profiles.get((size, b)),
            stages=m.stages.get((size, b)),
            pipelined_ms_per_img=m.pipelined[size, b] / b * 1e3 if (size, b) in m.pipelined else None,
            streamdiffusion_ms_per_img=stream.per_batch[size, b] / b * 1e3 if stream else None,
        )
        for size in config.all_sizes()
        for b in config.batches
        for v, m in ours.items()
    ]
    cuda = _cuda(settings)
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "cuda": torch.version.cuda if cuda else None,
        "weights": settings.weights,
        "steps": config.steps,
        "guidance_scale": config.guidance_scale,
        "strength": config.strength if config.task == "i2i" else None,
        "iters": config.iters,
        "new_prompts": config.new_prompts,
        "warmup": {
            "livegen": ours[config.variants[0]].warmup,
            "diffusers": theirs.warmup if theirs else {},
            **({"streamdiffusion": stream.warmup} if stream else {}),
        },
        "streamdiffusion": _version("streamdiffusion") if stream else None,
        "variants": {v: m.warmup for v, m in ours.items()},
        "rows": [r.as_dict() for r in rows],
    }


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _gib(n: int | None) -> str:
    return f"{n / 2**30:.2f} GiB" if n else "-"


def _variant_width(rows: list[dict[str, Any]], least: int) -> int:
    """A table's variant column: ``least`` wide, or as wide as its longest variant name."""
    return max([least, *(len(r.get("variant", "default")) for r in rows)])


def format_stages(rows: list[dict[str, Any]]) -> list[str]:
    """Where a livegen batch's wall time went (the worker's stages, medians in ms per batch):
    wall - device is the time the device waited for the host."""
    rows = [r for r in rows if (r.get("stages") or {}).get("batches")]
    if not rows:
        return []
    names = [*STAGES, "handback", "inputs", "launch"]
    width = _variant_width(rows, 22)
    lines = [
        "",
        "livegen batch stages, ms per batch (medians): wait = submitted -> started, enqueue = the adapter's call "
        "(embeddings, inputs, launch), until_done = -> device seen done, encode = -> images ready, "
        "finish = -> futures resolved, handback = -> the caller has them; inputs and launch: the fast path's "
        "parts of enqueue",
        f"{'variant':<{width}} {'size':>4} {'batch':>5} {'wall':>8} {'device':>8}" + "".join(f"{n:>11}" for n in names),
    ]
    for r in rows:
        st = r["stages"]
        device = st.get("device_ms")
        lines.append(
            f"{r.get('variant', 'default'):<{width}} {r['size']:>4} {r['batch']:>5} {st.get('wall_ms', 0):>8.3f}"
            f" {device if device is not None else '-':>8}"
            + "".join(f"{st[f'{n}_ms']:>11.3f}" if st.get(f"{n}_ms") is not None else f"{'-':>11}" for n in names)
        )
    return lines


def format_table(report: dict[str, Any]) -> str:
    head = (
        f"device {report['device']}, torch {report['torch']}, diffusers {report.get('diffusers')}, "
        f"weights {report['weights']}, steps {report['steps']}, {report['iters']} timed iterations per row"
        + (", a new prompt for every livegen image (no cached embeddings)" if report.get("new_prompts") else "")
    )
    width = _variant_width(report["rows"], 13)
    lines = [
        head,
        "",
        f"task  model                      size  batch  {'variant':<{width}}  livegen ms/img  img/s  first call ms"
        "  diffusers ms/img  img/s  speedup  | livegen, 2 batches in flight: ms/img  img/s",
    ]
    for r in report["rows"]:
        theirs = r.get("diffusers_ms_per_img")
        lines.append(
            f"{r['task']:<5} {r['model']:<26} {r['size']:>4} {r['batch']:>6}  {r.get('variant', 'default'):<{width}}"
            f"{r['livegen_ms_per_img']:>15.2f} {r['livegen_img_per_s']:>6.1f} {r.get('first_call_ms') or 0:>14.1f}"
            + (f"{theirs:>18.2f} {r['diffusers_img_per_s']:>6.1f} {r['speedup']:>7.2f}x" if theirs else " " * 33)
            + (
                f"  | {r['pipelined_ms_per_img']:>36.2f} {r['pipelined_img_per_s']:>6.1f}"
                if r.get("pipelined_ms_per_img")
                else ""
            )
        )
    lines += format_streamdiffusion(report, width)
    lines += format_stages(report["rows"])
    for r in report["rows"]:
        if r.get("profile"):
            label = f"{r.get('variant', 'default')} {r['size']} batch {r['batch']}"
            lines += format_profile(label, r["profile"], wall_ms=r["livegen_ms_per_img"] * r["batch"])
    for v, w in report.get("variants", {}).items():
        fast = w.get("fast_path") or {}
        extra = (
            f", {fast['graphs']} CUDA graphs captured in {fast['capture_s']:.1f} s, compile {fast['compile_s']:.1f} s"
            if fast
            else ""
        )
        if fast.get("graph_failures"):
            extra += f", {fast['graph_failures']} CAPTURES FAILED (ran eagerly): {fast.get('graph_error')}"
        if fast.get("compile_failures"):
            extra += f", {fast['compile_failures']} COMPILES FAILED (ran uncompiled): {fast.get('compile_error')}"
        if fast.get("fp8_linears"):
            extra += f", {fast['fp8_linears']} UNet linears in float8"
        if fast.get("fp8_geglus"):
            extra += f", {fast['fp8_geglus']} GEGLUs quantized in one kernel"
        if fast.get("compiled_shapes") or fast.get("uncompiled_shapes"):
            extra += f", {fast.get('compiled_shapes', 0)} shapes compiled"
            if fast.get("channels_last_cats"):
                extra += f", {fast['channels_last_cats']} concatenations pinned channels_last"
            if fast.get("uncompiled_shapes"):
                extra += f", {fast['uncompiled_shapes']} NOT COMPILED (ran as plain graphs)"
        if "dynamo_graphs" in w:
            extra += f", {w['dynamo_graphs']} dynamo graphs"
        if w.get("inductor_options"):
            extra += f", inductor options {json.dumps(w['inductor_options'], sort_keys=True)}"
        vram = (
            f", VRAM model {_gib(w.get('vram_model_bytes'))} peak {_gib(w.get('vram_peak_bytes'))}"
            if "vram_peak_bytes" in w
            else ""
        )
        lines.append(
            f"warm-up livegen {v} ({w.get('dtype')}): load {w['load_s']:.1f} s, "
            f"first image {w['first_image_s']:.2f} s{extra}{vram}"
        )
    for name in ("diffusers", "streamdiffusion"):
        theirs_w = report["warmup"].get(name)
        if theirs_w:
            vram = f", VRAM peak {_gib(theirs_w.get('vram_peak_bytes'))}" if "vram_peak_bytes" in theirs_w else ""
            lines.append(
                f"warm-up {name}: load {theirs_w['load_s']:.1f} s, first image {theirs_w['first_image_s']:.2f} s{vram}"
            )
    return "\n".join(lines)


def format_streamdiffusion(report: dict[str, Any], width: int) -> list[str]:
    """With --streamdiffusion: its torch pipeline's rows beside each livegen variant's."""
    rows = [r for r in report["rows"] if r.get("streamdiffusion_ms_per_img")]
    if not rows:
        return []
    lines = [
        "",
        f"StreamDiffusion {report.get('streamdiffusion')} (its PyTorch pipeline with TAESD, no TensorRT; the same "
        "work in the same process)",
        f"size  batch  {'variant':<{width}}  livegen ms/img  StreamDiffusion ms/img  img/s  livegen speedup",
    ]
    for r in rows:
        lines.append(
            f"{r['size']:>4} {r['batch']:>6}  {r.get('variant', 'default'):<{width}}{r['livegen_ms_per_img']:>16.2f}"
            f"{r['streamdiffusion_ms_per_img']:>24.2f} {r['streamdiffusion_img_per_s']:>6.1f}"
            f"{r['speedup_vs_streamdiffusion']:>16.2f}x"
        )
    return lines
