"""What the engine renders once at start, so the first real request finds its CUDA graph
captured (or its shape compiled) and its kernels chosen.

For each model loaded at start: every ``warmup_sizes`` x ``warmup_buckets``, with the family's
fal defaults (turbo: 2 steps, guidance 1; LCM: 6 steps, guidance 1.5) for text-to-image and for
image-to-image at the default strength 0.95. Other shapes are captured on first use.
"""

from __future__ import annotations

from PIL import Image

from livegen.engine import GenerationRequest, Priority, Task
from livegen.engine.registry import ModelSpec
from livegen.settings import Settings

# (task, steps, guidance_scale, strength) per family, as fal's schemas default them.
_DEFAULTS: dict[str, list[tuple[Task, int, float, float]]] = {
    "turbo": [(Task.TEXT_TO_IMAGE, 2, 1.0, 1.0), (Task.IMAGE_TO_IMAGE, 2, 1.0, 0.95)],
    "lcm": [(Task.TEXT_TO_IMAGE, 6, 1.5, 1.0), (Task.IMAGE_TO_IMAGE, 6, 1.5, 0.95)],
}


def parse_size(size: str) -> tuple[int, int]:
    w, _, h = size.lower().partition("x")
    return int(w), int(h)


def warmup_batches(spec: ModelSpec, settings: Settings) -> list[list[GenerationRequest]]:
    batches = []
    for size in settings.warmup_sizes:
        width, height = parse_size(size)
        image = Image.new("RGB", (width, height), (127, 127, 127))
        for bucket in settings.warmup_buckets:
            for task, steps, guidance, strength in _DEFAULTS["lcm" if spec.family == "lcm" else "turbo"]:
                batches.append(
                    [
                        GenerationRequest(
                            model_id=spec.model_id,
                            task=task,
                            prompt="warm-up",
                            width=width,
                            height=height,
                            num_inference_steps=steps,
                            guidance_scale=guidance,
                            seed=i,
                            strength=strength,
                            image=image if task is Task.IMAGE_TO_IMAGE else None,
                            priority=Priority.QUEUED,
                        )
                        for i in range(bucket)
                    ]
                )
    return batches
