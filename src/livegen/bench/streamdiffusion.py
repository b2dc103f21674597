"""StreamDiffusion beside livegen, in the same process and on the same device (``livegen bench
--streamdiffusion``).

StreamDiffusion (cumulo-autumn/StreamDiffusion, the PyPI release 0.1.1) publishes 106 fps t2i
and 94 fps i2i for SD-Turbo, 1 step, on an RTX 4090 with TensorRT. TensorRT cannot be carried
to our GPU machines, so this times StreamDiffusion's own PyTorch pipeline, configured the way its
wrapper (``utils/wrapper.py``) configures SD-Turbo: ``t_index_list=[0]`` (t2i) or one index
(i2i), ``cfg_type="none"``, TAESD as the VAE, fp16 on CUDA, the batch as its frame buffer, and
its output turned into PIL images the way the wrapper's ``postprocess_image`` does. What it
measures is StreamDiffusion without its TensorRT engines, not its published configuration.

Install it without its dependencies (it pins diffusers 0.24; its pipeline runs on livegen's):
``pip install --no-deps streamdiffusion==0.1.1``. SD-Turbo only: StreamDiffusion 0.1.1 has no
SDXL pipeline, and with LCM's several steps its "stream batch" gives each call one step of
several frames, which is other work than a batch of whole images.
"""

from __future__ import annotations

import functools
import gc
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from livegen.engine.registry import resolve_source, spec_for
from livegen.settings import Settings

SUPPORTED = ("stabilityai/sd-turbo",)
# Its wrapper prepares 50 LCM timesteps; t2i takes index 0 (t = 999), i2i one index of them (its
# examples use 16 to 45). One UNet pass whichever index: the same work as livegen's 2 × 0.5.
INFERENCE_STEPS = 50
I2I_T_INDEX = 32


class StreamDiffusionUnavailable(RuntimeError):
    """StreamDiffusion is not installed, or cannot do this benchmark's work."""


def check(model: str) -> None:
    """Raise ``StreamDiffusionUnavailable`` (a clear message) unless a run can start."""
    if model not in SUPPORTED:
        raise StreamDiffusionUnavailable(f"the StreamDiffusion baseline runs {', '.join(SUPPORTED)} only, not {model}")
    try:
        import streamdiffusion  # noqa: F401
    except ImportError as exc:
        raise StreamDiffusionUnavailable(
            f"StreamDiffusion is not importable ({exc}): pip install --no-deps streamdiffusion==0.1.1"
        ) from None


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """StreamDiffusion's ``postprocess_image(..., output_type="pil")``: denormalize, to NumPy, to
    PIL. (Its module imports torchvision, which a CPU machine may lack; these are its steps.)"""
    array = (images / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]


def bench_streamdiffusion(settings: Settings, config: Any) -> Any:
    """Per (size, batch): build StreamDiffusion for that shape (its buffers are sized at
    ``prepare``), a first call, then ``config.iters`` timed calls. Returns an engine bench
    ``Measured``. ``check`` first: this assumes it passed."""
    from diffusers import AutoencoderTiny, StableDiffusionPipeline
    from streamdiffusion import StreamDiffusion

    from livegen.bench.engine import PROMPT, Measured, _cuda, _input_image, _timed

    spec = spec_for(config.model)
    device = torch.device("cuda" if _cuda(settings) else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(resolve_source(spec.base_repo, settings), dtype=dtype)
    pipe = pipe.to(device)
    tiny = AutoencoderTiny.from_pretrained(resolve_source(spec.tiny_vae_repo, settings), dtype=dtype)
    tiny = tiny.to(device)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()

    def stream_for(size: int, batch: int) -> Any:
        t2i = config.task == "t2i"
        stream = StreamDiffusion(
            pipe,
            t_index_list=[0] if t2i else [I2I_T_INDEX],
            torch_dtype=dtype,
            width=size,
            height=size,
            frame_buffer_size=batch,
            cfg_type="none",
        )
        stream.vae = tiny
        stream.prepare(PROMPT, num_inference_steps=INFERENCE_STEPS, guidance_scale=0.0)
        return stream

    def run(stream: Any, size: int, batch: int, image: Image.Image) -> None:
        # Without autograd, as its wrapper runs everything (torch.set_grad_enabled(False) at import).
        with torch.no_grad():
            if config.task == "t2i":
                out = to_pil(stream.txt2img_sd_turbo(batch))
            elif device.type == "cuda":
                out = to_pil(stream([image] * batch))
            else:  # its __call__ times itself with CUDA events; on a CPU, its steps without them
                x = stream.image_processor.preprocess([image] * batch, size, size).to(device=device, dtype=dtype)
                out = to_pil(stream.decode_image(stream.predict_x0_batch(stream.encode_image(x))))
        if len(out) != batch or out[0].size != (size, size):
            raise RuntimeError(f"StreamDiffusion returned {len(out)} images of {out[0].size}, not {batch} of {size}²")

    measured = Measured(warmup={}, per_batch={})
    for size in config.all_sizes():
        image = _input_image(size)
        for batch in config.batches:
            stream = stream_for(size, batch)
            t0 = time.perf_counter()
            run(stream, size, batch, image)
            measured.first_call[size, batch] = time.perf_counter() - t0
            measured.per_batch[size, batch] = _timed(
                functools.partial(run, stream, size, batch, image), device, config.iters
            )
    measured.warmup = {"load_s": loaded - started, "first_image_s": min(measured.first_call.values())}
    if device.type == "cuda":
        measured.warmup["vram_peak_bytes"] = torch.cuda.max_memory_allocated()
    return measured
