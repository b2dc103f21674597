"""``livegen bench`` (engine mode): livegen's engine and stock diffusers, same work, same run.

For each batch size, livegen's worker gets ``batch`` requests at once (it renders them as one
batch and encodes each image to JPEG, which is what a user receives), and stock diffusers does
what its docs show: ``AutoPipelineFor{Text2Image,Image2Image}.from_pretrained`` in fp16 on a
GPU (fp32 on a CPU), default VAE, a list of ``batch`` prompts, PIL output. Warm-up runs are
excluded from the timings and reported on their own (time to the first image). Numbers from a
CPU are a smoke check; the ones that count come from a GPU with ``--weights random``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from livegen.engine import GenerationRequest, Priority, Task
from livegen.engine.registry import resolve_source, spec_for
from livegen.engine.worker import Worker
from livegen.settings import Settings

PROMPT = "a photo of a red fox in the snow, detailed, 4k"


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


@dataclass
class Row:
    task: str
    model: str
    size: int
    batch: int
    livegen_ms_per_img: float
    diffusers_ms_per_img: float | None

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["livegen_img_per_s"] = 1000 / self.livegen_ms_per_img
        if self.diffusers_ms_per_img is not None:
            out["diffusers_img_per_s"] = 1000 / self.diffusers_ms_per_img
            out["speedup"] = self.diffusers_ms_per_img / self.livegen_ms_per_img
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


def bench_livegen(settings: Settings, config: EngineBenchConfig) -> tuple[dict[str, float], dict[int, float]]:
    """(warm-up facts, seconds per batch by batch size)."""
    task = Task.TEXT_TO_IMAGE if config.task == "t2i" else Task.IMAGE_TO_IMAGE
    image = _input_image(config.size) if task is Task.IMAGE_TO_IMAGE else None
    per_batch: dict[int, float] = {}
    started = time.perf_counter()
    settings = settings.model_copy(update={"models": [config.model], "max_batch_size": max(config.batches)})
    with Worker.start(settings) as worker:
        worker.startup.result()
        loaded = time.perf_counter()

        def run_batch(batch: int) -> None:
            requests = [
                GenerationRequest(
                    model_id=config.model,
                    task=task,
                    prompt=PROMPT,
                    width=config.size,
                    height=config.size,
                    num_inference_steps=config.steps,
                    guidance_scale=0.0,
                    seed=i,
                    strength=config.strength,
                    image=image,
                    priority=Priority.REALTIME,
                )  # fmt: skip
                for i in range(batch)
            ]
            futures = [worker.submit(r) for r in requests]
            for f in futures:
                f.result()

        run_batch(1)
        first = time.perf_counter()
        for batch in config.batches:
            run_batch(batch)  # warm-up at this shape
            per_batch[batch] = _timed(lambda b=batch: run_batch(b), worker.device, config.iters)
    warmup = {"load_s": loaded - started, "first_image_s": first - loaded}
    return warmup, per_batch


def bench_diffusers(settings: Settings, config: EngineBenchConfig) -> tuple[dict[str, float], dict[int, float]]:
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

    spec = spec_for(config.model)
    device = torch.device("cuda" if settings.device != "cpu" and torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    source = resolve_source(spec.base_repo, settings)
    started = time.perf_counter()
    cls = AutoPipelineForText2Image if config.task == "t2i" else AutoPipelineForImage2Image
    pipe = cls.from_pretrained(source, torch_dtype=dtype).to(device)
    if spec.lora_repo is not None:
        from diffusers import LCMScheduler

        pipe.load_lora_weights(resolve_source(spec.lora_repo, settings))
        pipe.fuse_lora()
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    image = _input_image(config.size)

    def run_batch(batch: int) -> None:
        kwargs: dict[str, Any] = {"num_inference_steps": config.steps, "guidance_scale": 0.0, "output_type": "pil"}
        if config.task == "t2i":
            kwargs.update(height=config.size, width=config.size)
        else:
            kwargs.update(image=[image] * batch, strength=config.strength)
        pipe(prompt=[PROMPT] * batch, **kwargs)

    run_batch(1)
    first = time.perf_counter()
    per_batch: dict[int, float] = {}
    for batch in config.batches:
        run_batch(batch)
        per_batch[batch] = _timed(lambda b=batch: run_batch(b), device, config.iters)
    return {"load_s": loaded - started, "first_image_s": first - loaded}, per_batch


def run_engine_bench(settings: Settings, config: EngineBenchConfig) -> dict[str, Any]:
    ours_warm, ours = bench_livegen(settings, config)
    theirs_warm: dict[str, float] = {}
    theirs: dict[int, float] = {}
    if config.baseline:
        theirs_warm, theirs = bench_diffusers(settings, config)
    rows = [
        Row(config.task, config.model, config.size, b, ours[b] / b * 1e3, theirs[b] / b * 1e3 if b in theirs else None)
        for b in config.batches
    ]
    device = "cuda" if settings.device != "cpu" and torch.cuda.is_available() else "cpu"
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "weights": settings.weights,
        "steps": config.steps,
        "iters": config.iters,
        "warmup": {"livegen": ours_warm, "diffusers": theirs_warm},
        "rows": [r.as_dict() for r in rows],
    }


def format_table(report: dict[str, Any]) -> str:
    head = (
        f"device {report['device']}, torch {report['torch']}, weights {report['weights']}, "
        f"steps {report['steps']}, {report['iters']} timed iterations per row"
    )
    lines = [
        head,
        "",
        "task  model                      size  batch  livegen ms/img  img/s  diffusers ms/img  img/s  speedup",
    ]
    for r in report["rows"]:
        theirs = r.get("diffusers_ms_per_img")
        lines.append(
            f"{r['task']:<5} {r['model']:<26} {r['size']:>4} {r['batch']:>6} {r['livegen_ms_per_img']:>15.1f} "
            f"{r['livegen_img_per_s']:>6.1f} "
            + (f"{theirs:>17.1f} {r['diffusers_img_per_s']:>6.1f} {r['speedup']:>7.2f}x" if theirs else "")
        )
    for who, w in report["warmup"].items():
        if w:
            lines.append(f"warm-up {who}: load {w['load_s']:.1f} s, first image {w['first_image_s']:.2f} s")
    return "\n".join(lines)
