"""The fast path: the few-step loop written directly over a pipeline's modules.

Stock diffusers pipelines rebuild everything per call (prompt checks, timesteps, latents,
postprocessing through NumPy and PIL) and launch each kernel from Python, which on a GPU is
bound by launch overhead at batch 1 (DESIGN.md: 33 ms of launches around 8.6 ms of GPU work).
This module runs the same arithmetic as ``StableDiffusion{,XL}{,Img2Img}Pipeline`` with
Euler, Euler-ancestral or LCM schedulers, but as one function of fixed-shape tensors:

    noise [, input image, ancestral noise]  ->  UNet steps  ->  VAE decode  ->  uint8 pixels

so that on CUDA it can be captured once per (task, size, steps, strength, cfg, vae, bucket)
as a CUDA graph (or compiled with ``torch.compile``) and replayed. Batches are padded up to
the next bucket (1, 2, 4, 8, 16) so batching never recaptures. Random draws come from the
same per-image generators, in the same order and dtype, as the pipelines' own draws, so for
the same seed the fast path reproduces the plain pipeline's pixels (see
``tests/engine/test_fastpath.py`` for the tolerance and why). On a CPU the same code runs
eagerly, which is what the CPU tests exercise.

Not covered here (the adapters fall back to the plain pipeline): inpainting,
``guidance_rescale``, UNets with a guidance embedding (``time_cond_proj_dim``) and
schedulers other than Euler, Euler-ancestral and LCM.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, TypeVar, cast

import numpy as np
import torch
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from livegen.engine import DeviceImage, EncodedImage, Task, fp8, layout, unet_steps
from livegen.engine.text_graph import graph_text_encoders

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16)
DEVICE_MS_SMOOTHING = 0.2  # weight of the newest batch in the device-time average
RECOMPILE_LIMIT = 256  # compiled shapes per module under torch.compile (dynamo's default: 8)
VaeChoice = Literal["tiny", "full"]
CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune-no-cudagraphs"]
T = TypeVar("T")
U = TypeVar("U")
_SCHEDULERS = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, LCMScheduler)
# Named ranges of a batch, for ``livegen bench --profile`` (see ``region``), in the order they run.
REGIONS = ("livegen.inputs", "livegen.vae_encode", "livegen.unet", "livegen.vae_decode")


def region(name: str) -> contextlib.AbstractContextManager[Any]:
    """A named range for torch's profiler; a null context (no dispatcher call) when none runs.
    A CUDA graph replays without running this code, so only eager batches show regions."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class FastOptions:
    cuda_graphs: bool = True
    compile: CompileMode = "off"
    compile_tuning: bool = False
    compile_dynamic_batch: bool = False
    inductor_options: tuple[tuple[str, Any], ...] = ()  # torch.compile's options, on top of the mode's
    fuse_qkv: bool = False
    cudnn_benchmark: bool = False
    sdpa_cudnn: bool = False
    buckets: tuple[int, ...] = BUCKETS
    channels_last: bool = True
    nhwc_group_norm: bool = False
    keep_channels_last: bool = True  # with channels_last (engine/layout.py): no NCHW transformer outputs or cats
    split_geglu: bool = True
    fp8_linear: bool = False  # the UNet's transformer matmuls in float8 (engine/fp8.py)
    fp8_geglu_kernel: bool = True  # with fp8_linear on CUDA: GEGLU + quantization in one kernel (engine/fp8_geglu.py)
    tiny_vae_conv_relu: bool = True
    tiny_vae_fold_upsample: bool = True
    gpu_jpeg: bool = True
    jpeg_quality: int = 90
    graph_warmup_iters: int = 2
    text_encoder_graph: bool = True  # with cuda_graphs on CUDA: new prompts encoded by graph replays


@dataclass(frozen=True)
class Job:
    """One fast-path batch, one row per image (requests already expanded by num_images)."""

    task: Task
    width: int
    height: int
    steps: int
    strength: float
    guidance_scale: float
    vae: VaeChoice
    embeds: torch.Tensor  # (n, seq, dim)
    generators: list[torch.Generator]
    negative_embeds: torch.Tensor | None = None  # set when classifier-free guidance is on
    pooled: torch.Tensor | None = None  # SDXL: (n, dim)
    negative_pooled: torch.Tensor | None = None
    images: Sequence[Image.Image | DeviceImage] | None = None  # i2i inputs, RGB, width x height
    crops: Sequence[tuple[int, int] | None] = ()  # per row: center-crop to (w, h)
    formats: Sequence[str] = ()  # per row: "jpeg" | "png" (GPU JPEG encode when possible)

    @property
    def cfg(self) -> bool:
        return self.negative_embeds is not None

    @property
    def rows(self) -> int:
        return int(self.embeds.shape[0])


@dataclass
class _Plan:
    """What a graph bakes in: the schedule's constants for one (task, steps, strength) on the device."""

    timesteps: list[torch.Tensor]  # per step, 0-dim, as the pipeline hands them to the UNet
    c_in: list[torch.Tensor | None]  # Euler: scale_model_input divides by this; LCM: None
    step_consts: list[dict[str, torch.Tensor]]
    draws_noise: list[bool]  # per step: does the scheduler draw fresh noise (ancestral, LCM)
    init_sigma: torch.Tensor | None = None  # t2i: initial noise scale
    add_noise: dict[str, torch.Tensor] = field(default_factory=dict)  # i2i: how noise meets the image latents


Output = Image.Image | EncodedImage


class Deferred(Generic[T]):
    """Results of a batch whose device work is enqueued; ``result()`` waits for it (the worker
    calls it off the device thread, so the next batch's CPU work overlaps this one's GPU work).
    ``expected_ms``: how long that device work should take (measured on earlier batches of the
    same shape), or None when there is no measurement yet. ``marks``, where known: ``inputs_s``
    and ``launch_s`` (the host's time building the inputs and launching the device work), and
    once ``result()`` has waited, ``device_done`` (the ``perf_counter`` time that wait returned)
    and ``device_s`` (the device's own time for the batch, from CUDA events)."""

    def __init__(
        self, finish: Callable[[], T], expected_ms: float | None = None, marks: dict[str, float] | None = None
    ) -> None:
        self._finish = finish
        self.expected_ms = expected_ms
        self.marks = {} if marks is None else marks

    def result(self) -> T:
        return self._finish()

    def then(self, fn: Callable[[T], U]) -> Deferred[U]:
        """The same device work, its results passed through ``fn``: same expectation, same marks."""
        return Deferred(lambda: fn(self.result()), self.expected_ms, self.marks)


@dataclass
class FastStats:
    graphs: int = 0
    capture_s: float = 0.0
    compiled_shapes: int = 0
    compile_s: float = 0.0  # first runs of compiled shapes: compiling (and capturing) them
    uncompiled_shapes: int = 0  # shapes first seen after warm-up, with compiling closed: graphs only
    compile_reused_shapes: int = 0  # compile_dynamic_batch: buckets that ran another bucket's compiled code
    compile_failures: int = 0  # shapes whose compile raised: they run as uncompiled graphs, and compiling stops
    compile_error: str = ""
    # keep_channels_last: concatenations pinned channels_last by the graphs inductor compiled in this
    # process (a graph loaded from inductor's cache runs no pass and adds none)
    channels_last_cats: int = 0
    padded_rows: int = 0
    gpu_jpeg_images: int = 0
    graph_failures: int = 0
    graph_error: str = ""
    text_graphs: int = 0  # text encoders' CUDA graphs captured (engine/text_graph.py)
    text_graph_replays: int = 0  # prompts encoded by replaying one
    fp8_linears: int = 0  # fp8_linear: the UNet's linear layers running in float8 (engine/fp8.py)
    fp8_geglus: int = 0  # fp8_geglu_kernel: feed-forwards whose GEGLU and quantization are one kernel


class FastPath:
    """The few-step loop over one loaded pipeline's UNet, VAE(s) and scheduler."""

    def __init__(
        self,
        pipe: Any,
        *,
        sdxl: bool,
        tiny_vae: torch.nn.Module | None,
        device: torch.device,
        dtype: torch.dtype,
        options: FastOptions,
    ) -> None:
        self.unet = pipe.unet
        self.full_vae = pipe.vae
        self.tiny_vae = tiny_vae
        self.scheduler = pipe.scheduler
        self.sdxl = sdxl
        self.device = device
        self.dtype = dtype
        self.options = options
        self.stats = FastStats()
        self.vae_scale_factor = 2 ** (len(self.full_vae.config.block_out_channels) - 1)
        self._graphs: dict[tuple[Any, ...], _Graph[torch.Tensor] | None] = {}  # None: capture failed, run eagerly
        # Device milliseconds per batch shape (CUDA events around each batch; a moving average,
        # the first run of a shape left out: it captures or compiles). The worker plans with it.
        self.device_ms: dict[tuple[Any, ...], float] = {}
        self._ran_keys: set[tuple[Any, ...]] = set()
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        self._time_ids: dict[tuple[int, int, int], torch.Tensor] = {}
        # torch.compile'd UNet forward and VAE decodes (None until the first compiled shape). The
        # modules themselves stay eager: the plain pipelines share them, and shapes first seen
        # after warm-up run uncompiled (see ``compile_new_shapes``).
        self._compiled_unet: Callable[..., Any] | None = None
        self._compiled_decode: dict[int, Callable[..., Any]] = {}
        self._compiled_keys: set[tuple[Any, ...]] = set()
        self._cat_pass: Any = None  # keep_channels_last: the post-grad pass the compiled graphs run
        self._uncompiled_keys: set[tuple[Any, ...]] = set()
        # Compile shapes not seen before? On at first; the worker turns it off after warm-up
        # (unless LIVEGEN_COMPILE_ON_DEMAND): compiling a new shape costs ~100 s on an H100, a
        # stall no realtime session should meet because a second client made a batch of 2.
        self.compile_new_shapes = True
        self._pool: Any = None
        # SDXL's full VAE overflows in fp16; its pipelines decode in fp32 (force_upcast). So do we,
        # with our own fp32 copy, leaving the pipeline's modules as they are.
        self._full_vae_fp32: torch.nn.Module | None = None
        if sdxl and dtype == torch.float16 and getattr(self.full_vae.config, "force_upcast", False):
            self._full_vae_fp32 = copy.deepcopy(self.full_vae).to(torch.float32)
        self._prepare_modules()
        self._graph_text_encoders(pipe)

    # -- set-up -------------------------------------------------------------------------------

    def _prepare_modules(self) -> None:
        modules = [self.unet, self.full_vae, self.tiny_vae, self._full_vae_fp32]
        for m in modules:
            if m is None:
                continue
            if hasattr(m, "set_attn_processor") and getattr(m, "attn_processors", None):
                m.set_attn_processor(AttnProcessor2_0())  # torch's SDPA (flash / memory-efficient kernels)
            if self.device.type == "cuda" and self.options.channels_last:
                m.to(memory_format=torch.channels_last)
                if self.options.nhwc_group_norm:
                    keep_channels_last_in_group_norms(m)
        if self.options.keep_channels_last and self.options.channels_last:
            layout.transformer_outputs_channels_last(self.unet)
        if self.options.fuse_qkv:  # before fp8 (it fuses 16-bit weights) and split_geglu (it reads them)
            try:
                fuse_qkv(self.unet)
            except ValueError as exc:  # e.g. added KV projections, which diffusers does not fuse
                logger.warning("attention projections stay unfused: %s", exc)
        if self.options.fp8_linear:  # before split_geglu: a GEGLU whose projection is float8 keeps one matmul
            self.stats.fp8_linears = self._convert_fp8()
        if self.options.split_geglu:
            split_geglu(self.unet)
        if self.tiny_vae is not None:  # after the layout change above: the folded kernels copy it
            from livegen.engine.tiny_vae import fold_upsample_convs, fuse_conv_relu  # it builds on this module

            if self.options.tiny_vae_fold_upsample:
                fold_upsample_convs(self.tiny_vae)
            if self.options.tiny_vae_conv_relu:
                fuse_conv_relu(self.tiny_vae)
        for m in modules:  # the rewrites above included
            # Inference, as from_pretrained leaves a model: a module built with from_config is in
            # training mode, where diffusers' ResnetBlock2D copies its shortcut's input with
            # .contiguous() (an NCHW copy of each channels_last activation) and dropout draws.
            if m is not None:
                m.eval()
        if self.device.type == "cuda":
            self._pool = torch.cuda.graph_pool_handle()

    def _convert_fp8(self) -> int:
        """The UNet's transformer linears in float8 (engine/fp8.py); none, with a warning, where
        the device or this torch cannot run float8 matmuls."""
        reason = fp8.unsupported_reason(self.device)
        if reason is None:
            try:
                recipe = fp8.probe(self.device, self.dtype)
            except RuntimeError as exc:
                reason = str(exc)
        if reason is not None:
            logger.warning("the UNet's linear layers stay in %s: %s", str(self.dtype).removeprefix("torch."), reason)
            return 0
        # Under CUDA graphs with no compiled UNet, each layer's input quantization is compiled on
        # its own (one fused kernel instead of three PyTorch ops); a compiled UNet fuses it anyway.
        quantize = fp8.RowQuantizer() if self.device.type == "cuda" and self.options.compile == "off" else None
        converted = fp8.convert(self.unet, recipe, quantize)
        logger.info("%d of the UNet's linear layers run in float8 (%s)", converted, recipe)
        if self.options.fp8_geglu_kernel:
            self.stats.fp8_geglus = self._fuse_fp8_geglus()
        return converted

    def _fuse_fp8_geglus(self) -> int:
        """Each float8 GEGLU feed-forward's GELU, product and quantization in one kernel
        (engine/fp8_geglu.py), where it runs and agrees with the PyTorch ops; else none, said once."""
        try:
            from livegen.engine import fp8_geglu
        except ImportError as exc:  # no Triton (a CPU build of torch)
            reason: str | None = f"no Triton ({exc})"
        else:
            reason = fp8_geglu.check(self.device, self.dtype)
        if reason is not None:
            logger.warning("float8 GEGLUs run as PyTorch ops: %s", reason)
            return 0
        fused = fp8.fuse_geglu_quantization(self.unet, fp8_geglu.quantize)
        logger.info("%d float8 GEGLU feed-forwards quantize in one kernel", fused)
        return fused

    def _graph_text_encoders(self, pipe: Any) -> None:
        """On CUDA with graphs: a new prompt's encoding replays a CUDA graph of each text encoder
        (engine/text_graph.py), in a memory pool of its own."""
        if self.device.type != "cuda" or not self.options.cuda_graphs or not self.options.text_encoder_graph:
            return
        pool, warmup = torch.cuda.graph_pool_handle(), self.options.graph_warmup_iters
        graph_text_encoders(pipe, lambda fn, example: _Graph(fn, example, pool, warmup), self.stats)

    @staticmethod
    def unsupported_reason(pipe: Any) -> str | None:
        """Why this pipeline cannot take the fast path (None: it can)."""
        if not isinstance(pipe.scheduler, _SCHEDULERS):
            return f"scheduler {type(pipe.scheduler).__name__}"
        if pipe.scheduler.config.prediction_type != "epsilon":
            return f"prediction_type {pipe.scheduler.config.prediction_type}"
        if pipe.unet.config.time_cond_proj_dim is not None:
            return "a UNet with a guidance embedding"
        if getattr(pipe.config, "requires_aesthetics_score", False):
            return "aesthetic-score conditioning"
        if isinstance(pipe.scheduler, EulerDiscreteScheduler) and pipe.scheduler.config.use_karras_sigmas:
            return "karras sigmas"
        return None

    def vae_for(self, choice: VaeChoice) -> tuple[Any, torch.dtype]:
        if choice == "tiny":
            if self.tiny_vae is None:
                raise ValueError("no tiny VAE is loaded")
            return self.tiny_vae, self.dtype
        if self._full_vae_fp32 is not None:
            return self._full_vae_fp32, torch.float32
        return self.full_vae, self.dtype

    def bucket(self, rows: int) -> int:
        for b in self.options.buckets:
            if b >= rows:
                return b
        return rows

    # -- the schedule -------------------------------------------------------------------------

    def _plan(self, task: Task, steps: int, strength: float) -> _Plan:
        t_start = 0
        if task is Task.IMAGE_TO_IMAGE:
            t_start = max(steps - unet_steps(task, steps, strength), 0)
        key = (task, steps, t_start)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._build_plan(task, steps, t_start)
        return plan

    def _build_plan(self, task: Task, steps: int, t_start: int) -> _Plan:
        """The scheduler's own ``set_timesteps``, then the per-step constants its ``step`` would
        compute, in the same dtypes (so the arithmetic matches it operation for operation)."""
        sched = type(self.scheduler).from_config(self.scheduler.config)
        sched.set_timesteps(steps, device="cpu")
        dev = self.device

        def on(x: torch.Tensor) -> torch.Tensor:
            return x.to(dev)

        plan = _Plan(timesteps=[], c_in=[], step_consts=[], draws_noise=[])
        lcm = isinstance(sched, LCMScheduler)
        ancestral = isinstance(sched, EulerAncestralDiscreteScheduler)
        for i in range(t_start, steps):
            plan.timesteps.append(on(sched.timesteps[i]))
            plan.draws_noise.append((lcm or ancestral) and i != steps - 1)
            if lcm:
                plan.c_in.append(None)
                plan.step_consts.append({k: on(v) for k, v in _lcm_consts(sched, i).items()})
                continue
            sigma = sched.sigmas[i]
            plan.c_in.append(on((sigma**2 + 1) ** 0.5))
            if ancestral:
                sigma_to = sched.sigmas[i + 1]
                sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
                sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
                consts = {"sigma": sigma, "dt": sigma_down - sigma, "sigma_up": sigma_up}
            else:
                sigma_hat = sigma * (0.0 + 1)  # s_churn = 0, as the pipelines call it
                consts = {"sigma": sigma_hat, "dt": sched.sigmas[i + 1] - sigma_hat}
            plan.step_consts.append({k: on(v) for k, v in consts.items()})
        if task is Task.TEXT_TO_IMAGE:
            init = sched.init_noise_sigma
            plan.init_sigma = on(init if isinstance(init, torch.Tensor) else torch.tensor(init))
        elif lcm:
            alphas = sched.alphas_cumprod.to(device=dev, dtype=self.dtype)
            t = sched.timesteps[t_start : t_start + 1].to(dev)
            plan.add_noise = {
                "sqrt_alpha": (alphas[t] ** 0.5).flatten().reshape(-1, 1, 1, 1),
                "sqrt_one_minus_alpha": ((1 - alphas[t]) ** 0.5).flatten().reshape(-1, 1, 1, 1),
            }
        else:
            sigmas = sched.sigmas.to(device=dev, dtype=self.dtype)
            plan.add_noise = {"sigma": sigmas[[t_start]].flatten().reshape(-1, 1, 1, 1)}
        return plan

    # -- the function a graph captures ----------------------------------------------------------

    def _forward(
        self,
        plan: _Plan,
        vae_choice: VaeChoice,
        guidance_scale: float | None,
        inputs: dict[str, torch.Tensor],
        compiled: bool = False,
    ) -> torch.Tensor:
        """Static-shape inputs -> (batch, H, W, 3) uint8 on the device. No host sync inside."""
        vae, vae_dtype = self.vae_for(vae_choice)
        unet: Callable[..., Any] = self.unet
        decode: Callable[..., Any] = vae.decode
        if compiled:
            assert self._compiled_unet is not None
            unet, decode = self._compiled_unet, self._compiled_decode[id(vae)]
        # compile_dynamic_batch: the compiled UNet and decode see the batch dimension as dynamic.
        dynamic = compiled and self._batch_dynamic(int(inputs["noise"].shape[0]))
        if "image" in inputs:
            with region("livegen.vae_encode"):
                latents = self._encode_image(vae, vae_dtype, plan, inputs)
        else:
            assert plan.init_sigma is not None
            latents = inputs["noise"] * plan.init_sigma
        cfg = guidance_scale is not None
        added = None
        if self.sdxl:
            added = {"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}
        draw = 0
        for i, t in enumerate(plan.timesteps):
            model_in = torch.cat([latents] * 2) if cfg else latents
            c_in = plan.c_in[i]
            if c_in is not None:
                model_in = model_in / c_in
            if compiled:
                # One memory layout for every call: dynamo guards on strides, and an image-to-image
                # batch's latents (from the VAE encoder, channels_last) or a step's output (from
                # channels_last UNet outputs) would otherwise compile the whole UNet again.
                model_in = model_in.contiguous()
            if dynamic:
                _batch_dims(model_in, inputs["embeds"], *(added or {}).values())
            with region("livegen.unet"):
                eps = unet(
                    model_in, t, encoder_hidden_states=inputs["embeds"], added_cond_kwargs=added, return_dict=False
                )
            eps = eps[0]
            if cfg:
                uncond, text = eps.chunk(2)
                eps = uncond + guidance_scale * (text - uncond)
            noise = None
            if plan.draws_noise[i]:
                noise = inputs["step_noise"][draw]
                draw += 1
            latents = self._step(plan.c_in[i] is None, plan.step_consts[i], latents, eps, noise)
        with region("livegen.vae_decode"):
            return self._decode(decode, vae, vae_dtype, latents, compiled, dynamic)

    def _encode_image(
        self, vae: Any, vae_dtype: torch.dtype, plan: _Plan, inputs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        # VaeImageProcessor: uint8 -> float32 / 255 -> 2x - 1, then the pipeline's dtype.
        x = inputs["image"].permute(0, 3, 1, 2).to(torch.float32) / 255.0
        x = (2.0 * x - 1.0).to(self.dtype).to(vae_dtype)
        if self.device.type == "cuda" and self.options.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        encoded = vae.encode(x)
        if hasattr(encoded, "latent_dist"):
            dist = encoded.latent_dist
            lat = dist.mean + dist.std * inputs["vae_noise"]
        else:
            lat = encoded.latents
        lat = vae.config.scaling_factor * lat.to(self.dtype)
        noise = inputs["noise"]
        if "sigma" in plan.add_noise:
            return lat + noise * plan.add_noise["sigma"]
        return plan.add_noise["sqrt_alpha"] * lat + plan.add_noise["sqrt_one_minus_alpha"] * noise

    @staticmethod
    def _step(
        lcm: bool,
        c: dict[str, torch.Tensor],
        sample: torch.Tensor,
        eps: torch.Tensor,
        noise: torch.Tensor | None,
    ) -> torch.Tensor:
        """``scheduler.step`` for Euler, Euler-ancestral and LCM (epsilon prediction)."""
        if lcm:
            x0 = (sample - c["beta_sqrt"] * eps) / c["alpha_sqrt"]
            denoised = c["c_out"] * x0 + c["c_skip"] * sample
            if noise is None:
                return denoised
            return c["alpha_prev_sqrt"] * denoised + c["beta_prev_sqrt"] * noise
        sample32 = sample.to(torch.float32)
        x0 = sample32 - c["sigma"] * eps
        derivative = (sample32 - x0) / c["sigma"]
        prev = sample32 + derivative * c["dt"]
        if "sigma_up" in c and noise is not None:
            prev = prev + noise * c["sigma_up"]
        return prev.to(eps.dtype)

    def _decode(
        self,
        decode: Callable[..., Any],
        vae: Any,
        vae_dtype: torch.dtype,
        latents: torch.Tensor,
        compiled: bool = False,
        dynamic: bool = False,
    ) -> torch.Tensor:
        x = latents.to(vae_dtype) / vae.config.scaling_factor
        if compiled:
            x = x.contiguous()  # one layout for every call (see the UNet's input in _forward)
        if dynamic:
            _batch_dims(x)
        image = decode(x, return_dict=False)[0]
        image = (image * 0.5 + 0.5).clamp(0, 1)  # VaeImageProcessor.denormalize, in the VAE's dtype
        return (image.permute(0, 2, 3, 1).to(torch.float32) * 255).round().to(torch.uint8)

    # -- running a batch ----------------------------------------------------------------------

    def render(self, job: Job) -> Deferred[list[Output]]:
        """Enqueue ``job`` on the device; the Deferred's ``result()`` gives per-row outputs."""
        rows, bucket = job.rows, self.bucket(job.rows)
        if rows > bucket:  # above the largest bucket: run in largest-bucket chunks
            return self._render_chunks(job)
        plan = self._plan(job.task, job.steps, job.strength)
        guidance = job.guidance_scale if job.cfg else None
        key = (job.task, job.width, job.height, job.steps, len(plan.timesteps), guidance, job.vae, bucket)
        began = time.perf_counter()
        with region("livegen.inputs"):
            inputs = self._inputs(job, plan, bucket)
        inputs_done = time.perf_counter()
        # Timed from here: the small input kernels queued above are left out, and with them any
        # wait for this thread to queue them (the estimate errs short, which only gathers less).
        start = None
        if self.device.type == "cuda" and key in self._ran_keys:  # a first run captures or compiles: not timed
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        self._ran_keys.add(key)
        with torch.inference_mode():
            pixels = self._run(key, plan, job.vae, guidance, inputs)[:rows]
            self.stats.padded_rows += bucket - rows
            marks = {"inputs_s": inputs_done - began, "launch_s": time.perf_counter() - inputs_done}
            return self._collect(job, pixels, key, start, marks)

    def _timed(self, key: tuple[Any, ...], ms: float) -> None:
        """One more measurement of the shape ``key``'s device time (on the encode pool). A
        shorter time is taken up faster than a longer one: an estimate that is too long holds
        batches back while the device idles, one that is too short only gathers less."""
        last = self.device_ms.get(key)
        weight = DEVICE_MS_SMOOTHING * (2.5 if last is not None and ms < last else 1.0)
        self.device_ms[key] = ms if last is None else last + weight * (ms - last)

    def _render_chunks(self, job: Job) -> Deferred[list[Output]]:
        step = max(self.options.buckets)
        parts = [self.render(_slice_job(job, i, min(i + step, job.rows))) for i in range(0, job.rows, step)]
        expected = [p.expected_ms for p in parts]
        total = None if None in expected else sum(e for e in expected if e is not None)
        marks = _summed_marks(parts, ("inputs_s", "launch_s"))

        def finish() -> list[Output]:
            outputs = [out for part in parts for out in part.result()]
            marks.update(_summed_marks(parts, ("device_s",)))
            if all("device_done" in p.marks for p in parts):
                marks["device_done"] = max(p.marks["device_done"] for p in parts)
            return outputs

        return Deferred(finish, total, marks)

    def _inputs(self, job: Job, plan: _Plan, bucket: int) -> dict[str, torch.Tensor]:
        """The batch's tensors, padded to ``bucket`` rows. Random draws per generator, in the
        order the pipelines draw: [VAE posterior sample], initial noise, then each step's noise."""
        rows, dev, dtype = job.rows, self.device, self.dtype
        shape = (rows, 4, job.height // self.vae_scale_factor, job.width // self.vae_scale_factor)
        gens = job.generators
        inputs: dict[str, torch.Tensor] = {}
        if job.task is Task.IMAGE_TO_IMAGE:
            assert job.images is not None
            inputs["image"] = self._input_images(job.images)
            vae, vae_dtype = self.vae_for(job.vae)
            if not hasattr(vae, "latent_magnitude"):  # AutoencoderKL samples its posterior
                inputs["vae_noise"] = torch.cat([_draw(g, shape, dev, vae_dtype) for g in gens])
        inputs["noise"] = randn_tensor(shape, generator=gens, device=dev, dtype=dtype)
        n_draws = sum(plan.draws_noise)
        if n_draws:
            inputs["step_noise"] = torch.stack(
                [randn_tensor(shape, generator=gens, device=dev, dtype=dtype)
                 for _ in range(n_draws)]
            )  # fmt: skip
        embeds = job.embeds
        pooled = job.pooled
        if job.cfg:
            assert job.negative_embeds is not None
            embeds = torch.cat([_pad(job.negative_embeds, bucket), _pad(embeds, bucket)])
            if pooled is not None:
                assert job.negative_pooled is not None
                pooled = torch.cat([_pad(job.negative_pooled, bucket), _pad(pooled, bucket)])
        else:
            embeds = _pad(embeds, bucket)
            pooled = _pad(pooled, bucket) if pooled is not None else None
        inputs["embeds"] = embeds.to(dev, dtype)
        if self.sdxl:
            assert pooled is not None
            inputs["pooled"] = pooled.to(dev, dtype)
            # (original size, crop top-left, target size), as the SDXL pipelines build them
            key = (job.height, job.width, embeds.shape[0])
            if key not in self._time_ids:
                ids = torch.tensor([[job.height, job.width, 0, 0, job.height, job.width]], dtype=dtype)
                self._time_ids[key] = ids.to(dev).repeat(embeds.shape[0], 1)
            inputs["time_ids"] = self._time_ids[key]
        for name in ("image", "vae_noise", "noise"):
            if name in inputs:
                inputs[name] = _pad(inputs[name], bucket)
        if "step_noise" in inputs:
            inputs["step_noise"] = torch.stack([_pad(x, bucket) for x in inputs["step_noise"]])
        return inputs

    def _input_images(self, images: Sequence[Image.Image | DeviceImage]) -> torch.Tensor:
        """(rows, H, W, 3) uint8 on the device: Pillow images through one pinned copy, images
        the server had decoded on the device (nvjpeg) as they are."""
        dev = self.device
        if not any(isinstance(im, DeviceImage) for im in images):
            host = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images]))
            if dev.type == "cuda":
                host = host.pin_memory()
            return host.to(dev, non_blocking=True)
        rows: list[torch.Tensor] = []
        for im in images:
            if isinstance(im, DeviceImage):
                pixels = im.pixels.to(dev)
                if dev.type == "cuda":
                    # Allocated on the decoder's stream, read here on this one: keep its memory
                    # from being handed out again until this stream is done with it.
                    pixels.record_stream(torch.cuda.current_stream(dev))
                rows.append(pixels.permute(1, 2, 0))
            else:
                rows.append(torch.from_numpy(np.asarray(im, dtype=np.uint8)).to(dev))
        return torch.stack(rows)

    def _run(
        self,
        key: tuple[Any, ...],
        plan: _Plan,
        vae: VaeChoice,
        guidance: float | None,
        inputs: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        compiled = self._compiles(key)

        def fn(**kw: torch.Tensor) -> torch.Tensor:
            return self._forward(plan, vae, guidance, kw, compiled)

        with _cudnn_benchmark(self.options.cudnn_benchmark), _sdpa_order(self.options.sdpa_cudnn):
            try:
                return self._run_with(key, compiled, fn, inputs)
            except torch._dynamo.exc.TorchDynamoException as exc:  # raised by compiled code only
                if not compiled:
                    raise
                self._compile_failed(key, exc)

            def uncompiled(**kw: torch.Tensor) -> torch.Tensor:
                return self._forward(plan, vae, guidance, kw, False)

            return self._run_with(key, False, uncompiled, inputs)

    def _compile_failed(self, key: tuple[Any, ...], exc: Exception) -> None:
        """A shape's compile raised (inductor cannot lower an op, say): it runs as uncompiled
        graphs, the batch still gets its images, and no further shape is compiled (each attempt
        costs a minute or more and would likely fail the same way)."""
        logger.error("compiling %s failed; it runs uncompiled, and compiling stops: %s", key, exc, exc_info=exc)
        self._compiled_keys.discard(key)
        self._uncompiled_keys.add(key)
        self._graphs.pop(key, None)
        self.stats.compiled_shapes -= 1
        self.stats.uncompiled_shapes += 1
        self.stats.compile_failures += 1
        self.stats.compile_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]

    def _run_with(
        self, key: tuple[Any, ...], compiled: bool, fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        first = compiled and key not in self._compiled_keys
        started = time.perf_counter()
        if first:
            self._compiled_keys.add(key)
            self.stats.compiled_shapes += 1
        if (
            self.device.type != "cuda"
            or not self.options.cuda_graphs
            or (
                compiled and self.options.compile == "reduce-overhead"  # its own CUDA graphs
            )
        ):
            out = fn(**inputs)
            if first:
                self.stats.compile_s += time.perf_counter() - started
                logger.info("compiled %s in %.1f s", key, time.perf_counter() - started)
            return out
        if key not in self._graphs:
            try:
                self._graphs[key] = _Graph(fn, inputs, self._pool, self.options.graph_warmup_iters)
            except torch._dynamo.exc.TorchDynamoException:
                raise  # compiling failed (in the warm-up runs), not capturing: _run's to handle
            except RuntimeError as exc:  # a capture-unsafe op: serve this shape eagerly, and say so
                logger.exception("CUDA graph capture failed for %s; this shape runs eagerly", key)
                self._graphs[key] = None
                self.stats.graph_failures += 1
                self.stats.graph_error = f"{type(exc).__name__}: {exc}"[:300]
            else:
                self.stats.graphs += 1
                took = time.perf_counter() - started
                if first:  # compiling happens in the capture's warm-up runs
                    self.stats.compile_s += took
                else:
                    self.stats.capture_s += took
                logger.info("captured a CUDA graph for %s in %.2f s (compiled: %s)", key, took, compiled)
            # Hand back what the warm-up runs left cached (the graph's own pool is kept): without
            # this, every capture's warm-up peak stays reserved for the life of the process.
            torch.cuda.empty_cache()
        graph = self._graphs[key]
        return fn(**inputs) if graph is None else graph.replay(inputs)

    def _compiles(self, key: tuple[Any, ...]) -> bool:
        """Whether the shape ``key`` runs torch.compile'd code (compiling it on its first run)."""
        if self.options.compile == "off":
            return False
        if key in self._compiled_keys:
            return True
        if self._batch_dynamic(key[-1]) and any(
            k[:-1] == key[:-1] and self._batch_dynamic(k[-1]) for k in self._compiled_keys
        ):
            # Another bucket of this shape compiled the batch dimension as dynamic: dynamo runs that
            # code for this bucket too, with nothing to compile (a graph capture, as without compile).
            self._compiled_keys.add(key)
            self.stats.compile_reused_shapes += 1
            return True
        if not self.compile_new_shapes or self.stats.compile_failures:
            if key not in self._uncompiled_keys:
                self._uncompiled_keys.add(key)
                self.stats.uncompiled_shapes += 1
                if self.stats.compile_failures:
                    logger.warning("%s runs uncompiled: compiling stopped at a failure (logged above)", key)
                else:
                    logger.warning(
                        "%s was not compiled at warm-up; it runs uncompiled (add its size and batch bucket to "
                        "LIVEGEN_WARMUP_SIZES / LIVEGEN_WARMUP_BUCKETS, or set LIVEGEN_COMPILE_ON_DEMAND=true)",
                        key,
                    )
            return False
        self._compile()
        return True

    def _batch_dynamic(self, rows: int) -> bool:
        """compile_dynamic_batch: is a batch of ``rows`` compiled with a dynamic batch dimension?
        Not a batch of 1: dynamo specializes sizes 0 and 1 whatever it is told."""
        return self.options.compile_dynamic_batch and rows >= 2

    def _compile(self) -> None:
        """``torch.compile`` the UNet's forward and the VAE decodes, once (each new shape then compiles
        on its first run: dynamic=False specializes per shape)."""
        if self._compiled_unet is None:
            mode = self.options.compile
            if self.options.compile_tuning:
                _tune_inductor()
            # Every bucket, size, step count and CFG doubling is a shape of its own (dynamic=False),
            # each a recompile of the same code: past dynamo's limit (8) it would silently run eagerly.
            import torch._dynamo.config as dynamo_config

            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
            extra: dict[str, Any] = dict(self.options.inductor_options)
            if self.options.keep_channels_last and self.options.channels_last:
                self._cat_pass = layout.channels_last_cat_pass(self.stats)
                extra["post_grad_custom_post_pass"] = self._cat_pass
            how: dict[str, Any] = {"options": compile_options(mode, extra)} if extra else {"mode": mode}
            self._compiled_unet = torch.compile(self.unet.forward, dynamic=False, **how)
            vaes: list[Any] = [self.tiny_vae, self.full_vae, self._full_vae_fp32]
            for vae in vaes:
                if vae is not None:
                    self._compiled_decode[id(vae)] = torch.compile(vae.decode, dynamic=False, **how)

    def _collect(
        self,
        job: Job,
        pixels: torch.Tensor,
        key: tuple[Any, ...],
        start: torch.cuda.Event | None,
        marks: dict[str, float],
    ) -> Deferred[list[Output]]:
        """Start moving the pixels to the host (pinned, async) or encoding them on the GPU.
        ``marks``: the render's own stamps so far, handed on in the Deferred's."""
        crops = list(job.crops) or [None] * job.rows
        formats = list(job.formats) or ["png"] * job.rows
        cuda = self.device.type == "cuda"
        gpu_jpeg = cuda and self.options.gpu_jpeg and _encode_jpeg_gpu is not None
        on_gpu = [gpu_jpeg and fmt == "jpeg" for fmt in formats]
        rows: list[torch.Tensor] = [_crop(pixels[i], crops[i]) for i in range(job.rows)]
        # Everything that reads ``pixels`` (a CUDA graph's static output, rewritten by the next
        # replay) is enqueued here, on the device thread, before that replay can be.
        host: list[torch.Tensor | None] = [None] * job.rows
        chw: list[torch.Tensor] = []
        for i, row in enumerate(rows):
            if on_gpu[i]:
                chw.append(row.permute(2, 0, 1).contiguous())
            else:
                buf = torch.empty(row.shape, dtype=torch.uint8, pin_memory=cuda)
                host[i] = buf.copy_(row, non_blocking=cuda)
        done = torch.cuda.Event(enable_timing=start is not None) if cuda else None
        if done is not None:
            done.record()
        quality = self.options.jpeg_quality
        jpeg_stream = _side_stream("jpeg", self.device) if chw else None

        def finish() -> list[Output]:
            with torch.inference_mode(), torch.cuda.stream(jpeg_stream) if jpeg_stream else contextlib.nullcontext():
                return collect()

        def collect() -> list[Output]:
            # This batch's work only: the device thread may have queued the next batch behind it
            # on the default stream, and nothing here should wait for that one. The encode and
            # its copies run on the JPEG stream (see _side_stream), current in finish().
            if done is not None:
                done.synchronize()
                marks["device_done"] = time.perf_counter()
                if start is not None:
                    ms = start.elapsed_time(done)
                    self._timed(key, ms)
                    marks["device_s"] = ms / 1e3
            out: list[Output] = []
            encoded = iter(_encode_jpeg_gpu(chw, quality=quality) if chw and _encode_jpeg_gpu else [])
            for i in range(job.rows):
                if on_gpu[i]:
                    data = next(encoded).cpu().numpy().tobytes()
                    h, w = rows[i].shape[:2]
                    out.append(EncodedImage(data=data, width=int(w), height=int(h), content_type="image/jpeg"))
                    self.stats.gpu_jpeg_images += 1
                else:
                    buf = host[i]
                    assert buf is not None
                    out.append(Image.fromarray(buf.numpy().copy()))
            return out

        return Deferred(finish, self.device_ms.get(key), marks)


class _Graph(Generic[T]):
    """One captured replay of ``fn`` over static input buffers (copied into before each replay)."""

    def __init__(self, fn: Callable[..., T], example: dict[str, torch.Tensor], pool: Any, warmup: int):
        with torch.inference_mode():
            self.static = {k: v.clone() for k, v in example.items()}
            side = _side_stream("warmup", self.static[next(iter(self.static))].device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture: cuDNN/cuBLAS pick algorithms, allocate
                for _ in range(warmup):
                    fn(**self.static)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the encode pool may sync events or run nvjpeg meanwhile; only this
            # thread's calls must be capture-safe.
            with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.output = fn(**self.static)

    def replay(self, inputs: dict[str, torch.Tensor]) -> T:
        for k, v in inputs.items():
            self.static[k].copy_(v, non_blocking=True)
        self.graph.replay()
        return self.output


def fuse_qkv(unet: torch.nn.Module) -> int:
    """diffusers' ``fuse_qkv_projections`` (one matmul for Q, K and V of a self-attention layer,
    one for K and V of a cross-attention layer), then the separate projections' weights made views
    of the fused ones: diffusers keeps both copies (+~10 % of the UNet's weights); views keep the
    memory as it was and the separate layers still valid. Returns the layers fused."""
    from diffusers.models.attention_processor import Attention

    unet.fuse_qkv_projections()  # type: ignore[operator]
    fused = 0
    for module in unet.modules():
        if not isinstance(module, Attention) or not getattr(module, "fused_projections", False):
            continue
        parts, joint = ([module.to_k, module.to_v], module.to_kv) if module.is_cross_attention else (
            [module.to_q, module.to_k, module.to_v], module.to_qkv)  # fmt: skip
        start = 0
        for part in parts:
            rows = part.weight.shape[0]
            part.weight.data = joint.weight.data[start : start + rows]
            if part.bias is not None:
                part.bias.data = joint.bias.data[start : start + rows]
            start += rows
        fused += 1
    return fused


def split_geglu(module: torch.nn.Module) -> int:
    """Make ``module``'s GEGLU feed-forwards (every transformer block of SD 1.5/2.x/XL's UNet) project
    their value and gate halves with two matmuls instead of one (``geglu_two_matmuls``). diffusers
    splits one projection's output with ``chunk(2, dim=-1)``: two views whose rows are twice as
    long as their width, so ``gelu(gate)`` and ``value * ...`` run PyTorch's strided, non-vectorized
    CUDA kernels over the UNet's largest activations (at 512², batch 16: ~7.4 GB of traffic per
    UNet pass). Two matmuls over the two halves of the same weights give contiguous outputs and
    vectorized kernels. The weights are shared: no extra memory. A projection wrapped by something
    else (an unfused LoRA layer) is left as it is. Returns the GEGLUs changed."""
    from diffusers.models.activations import GEGLU

    return replace_forwards(
        module, lambda m: isinstance(m, GEGLU) and type(m.proj) is torch.nn.Linear, geglu_two_matmuls
    )


def geglu_two_matmuls(geglu: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """diffusers' ``GEGLU.forward`` (``value * gelu(gate)`` of one projection's two halves), with
    each half projected on its own. ``args``/``kwargs``: diffusers' deprecated ``scale``, ignored
    there too."""
    proj = cast(torch.nn.Linear, geglu.proj)
    half = proj.out_features // 2
    bias = proj.bias
    value = torch.nn.functional.linear(hidden_states, proj.weight[:half], None if bias is None else bias[:half])
    gate = torch.nn.functional.linear(hidden_states, proj.weight[half:], None if bias is None else bias[half:])
    return value * geglu.gelu(gate)  # type: ignore[operator]


def keep_channels_last_in_group_norms(module: torch.nn.Module) -> int:
    """Make ``module``'s GroupNorms compute channels_last inputs in place (``group_norm_nhwc``).
    PyTorch's CUDA GroupNorm makes its input contiguous (NCHW) and returns NCHW
    (pytorch/pytorch#111824): in a channels_last UNet each GroupNorm then costs a layout copy in
    and one back before the next convolution. Returns the GroupNorms changed."""
    return replace_forwards(module, lambda m: isinstance(m, torch.nn.GroupNorm), group_norm_nhwc)


def replace_forwards(
    module: torch.nn.Module, match: Callable[[torch.nn.Module], bool], forward: Callable[..., torch.Tensor]
) -> int:
    """``forward(m, ...)`` as the forward of each submodule ``m`` that ``match``es and has not had
    its forward replaced already. Returns how many were changed."""
    changed = 0
    for m in module.modules():
        if match(m) and "forward" not in vars(m):
            m.forward = functools.partial(forward, m)  # type: ignore[method-assign]
            changed += 1
    return changed


def group_norm_nhwc(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` for a channels_last half-precision ``x``, computed in its NHWC memory and
    returned channels_last: each group's sum and sum of squares accumulated in float32 straight
    from the input, then one ``x * scale + shift`` per element computed in float32 and stored in
    ``x``'s dtype. The variance as mean of squares less squared mean loses digits when a group's
    mean is far from zero against its spread: float32 keeps ~7, the half-precision input carries
    3-4, so the loss stays below the input's own rounding unless the mean exceeds ~30 spreads.
    Any other input (float32 included), or with autograd on, goes to PyTorch's own group norm."""
    if (
        torch.is_grad_enabled()
        or x.dim() != 4
        or x.dtype not in (torch.float16, torch.bfloat16)
        or x.is_contiguous()
        or not x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.nn.functional.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    n, c, h, w = x.shape
    g = norm.num_groups
    d = c // g
    rows = x.permute(0, 2, 3, 1).reshape(n, h * w, g, d)  # a view of the NHWC memory
    count = h * w * d
    mean = rows.sum(dim=(1, 3), keepdim=True, dtype=torch.float32) / count
    mean_sq = torch.linalg.vector_norm(rows, dim=(1, 3), keepdim=True, dtype=torch.float32).square() / count
    scale = torch.rsqrt((mean_sq - mean.square()).clamp_min(0) + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.float().view(1, 1, g, d)
    shift = -mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias.float().view(1, 1, g, d)
    out = torch.empty_like(rows)
    torch.addcmul(shift, rows, scale, out=out)  # computed in float32, stored in x's dtype
    return out.view(n, h, w, c).permute(0, 3, 1, 2)


def compile_options(mode: str, extra: dict[str, Any]) -> dict[str, Any]:
    """``torch.compile`` options: inductor's ``mode`` plus ``extra`` (torch.compile takes a mode
    or options, not both)."""
    import torch._inductor

    return {**torch._inductor.list_mode_options(mode), **extra}


def _tune_inductor() -> None:
    """The inductor settings diffusers' "speed up inference" guide gives for UNets."""
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True
    inductor.coordinate_descent_tuning = True
    inductor.epilogue_fusion = False
    inductor.coordinate_descent_check_all_directions = True


_STREAMS: dict[tuple[str, int], torch.cuda.Stream] = {}  # (purpose, device index): see _side_stream


@contextlib.contextmanager
def _cudnn_benchmark(on: bool) -> Iterator[None]:
    """cuDNN's algorithm timing for this batch's convolutions (set only around the fast path's
    own calls: the flag is process-wide, and the plain pipelines keep the default)."""
    if not on or torch.backends.cudnn.benchmark:
        yield
        return
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = False


def _sdpa_order(prefer_cudnn: bool) -> contextlib.AbstractContextManager[Any]:
    """With ``prefer_cudnn``, scaled_dot_product_attention tries cuDNN's attention first (then
    flash, memory-efficient, math: each is used only where it supports the inputs). The order is
    process-wide, so it is set only around the fast path's own calls and put back after (the
    device thread is the only one running attention). Without it, PyTorch's default order."""
    if not prefer_cudnn:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def _summed_marks(parts: list[Deferred[Any]], keys: tuple[str, ...]) -> dict[str, float]:
    """A batch run in chunks: each of ``keys`` summed over the chunks, where every chunk has it."""
    return {k: sum(p.marks[k] for p in parts) for k in keys if all(k in p.marks for p in parts)}


def _batch_dims(*tensors: torch.Tensor) -> None:
    """Tell dynamo the first dimension of these (a compiled call's inputs) varies between calls,
    so one compile serves every batch bucket above 1 instead of one compile per bucket."""
    import torch._dynamo

    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)


def _side_stream(purpose: Literal["warmup", "jpeg"], device: torch.device) -> torch.cuda.Stream:
    """One stream per purpose and device, made on first use and kept.

    ``warmup``: every capture's warm-up runs. The caching allocator keeps freed blocks per stream:
    with a fresh stream per capture, each capture's warm-up activations stayed cached on a stream
    nothing used again (SD-Turbo, 9 graphs: 3.9 GiB allocated, 6.2 GiB reserved).

    ``jpeg``: GPU JPEG encodes, idle but for them. torchvision's nvjpeg encoder synchronizes,
    before each image, the stream that was current when it was created (its fix for reading
    unfinished inputs, torchvision ≥ 0.22). Created on the default stream, it waited for
    everything queued there: with the next batch already queued behind this one, a batch's JPEGs
    (and so its results) waited for the next batch's UNet too. Created and called with this
    stream current (``warm_up_gpu_jpeg``, ``_collect``), it waits for nothing but its own work;
    ``_collect`` waits for the batch's event first."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if (purpose, index) not in _STREAMS:
        _STREAMS[purpose, index] = torch.cuda.Stream(device=index)
    return _STREAMS[purpose, index]


def _draw(gen: torch.Generator, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return randn_tensor((1, *shape[1:]), generator=gen, device=device, dtype=dtype)


def _lcm_consts(sched: LCMScheduler, i: int) -> dict[str, torch.Tensor]:
    """LCMScheduler.step's scalars at absolute step index ``i``."""
    t = sched.timesteps[i]
    prev_t = sched.timesteps[i + 1] if i + 1 < len(sched.timesteps) else t
    alpha_t = sched.alphas_cumprod[t]
    alpha_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
    c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
    return {
        "beta_sqrt": (1 - alpha_t).sqrt(),
        "alpha_sqrt": alpha_t.sqrt(),
        "c_skip": torch.as_tensor(c_skip),
        "c_out": torch.as_tensor(c_out),
        "alpha_prev_sqrt": torch.as_tensor(alpha_prev).sqrt(),
        "beta_prev_sqrt": (1 - torch.as_tensor(alpha_prev)).sqrt(),
    }


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad dim 0 to ``rows`` with zeros (padding rows are computed and dropped)."""
    if x.shape[0] >= rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def _crop(row: torch.Tensor, crop: tuple[int, int] | None) -> torch.Tensor:
    if crop is None:
        return row
    h, w = row.shape[:2]
    cw, ch = min(crop[0], w), min(crop[1], h)
    left, top = max(0, (w - cw) // 2), max(0, (h - ch) // 2)
    return row[top : top + ch, left : left + cw]


def _slice_job(job: Job, start: int, stop: int) -> Job:
    def cut(x: Any) -> Any:
        return None if x is None else x[start:stop]

    per_row = ("embeds", "generators", "negative_embeds", "pooled", "negative_pooled", "images", "crops", "formats")
    return replace(job, **{name: cut(getattr(job, name)) for name in per_row})


def _load_gpu_jpeg() -> Callable[..., list[torch.Tensor]] | None:
    """torchvision's nvjpeg encoder, when torchvision ≥ 0.22 is importable (an optional
    dependency). Older ones encode on their own stream without waiting for the input to be
    written (pytorch/vision#8929), so they are not used: PIL encodes instead."""
    try:
        import torchvision
        from torchvision.io import encode_jpeg
    except Exception:  # noqa: BLE001 - any import failure means: encode with PIL
        return None
    if _version(torchvision.__version__) < (0, 22):
        logger.warning(
            "torchvision %s's GPU JPEG encoder does not wait for its input; PIL encodes", torchvision.__version__
        )
        return None
    return encode_jpeg  # type: ignore[no-any-return]


def _version(text: str) -> tuple[int, ...]:
    """``"0.26.0+cu130"`` → ``(0, 26, 0)``."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


_encode_jpeg_gpu: Callable[..., list[torch.Tensor]] | None = None


def enable_gpu_jpeg(device: torch.device) -> bool:
    """Import torchvision's encoder (lazily: only a CUDA engine asks) and warm it up on ``device``
    (``warm_up_gpu_jpeg``). True when available."""
    global _encode_jpeg_gpu
    if _encode_jpeg_gpu is None:
        _encode_jpeg_gpu = _load_gpu_jpeg()
    if _encode_jpeg_gpu is not None:
        warm_up_gpu_jpeg(device)
    return _encode_jpeg_gpu is not None


def warm_up_gpu_jpeg(device: torch.device) -> None:
    """Encode a small image once with the JPEG stream current: torchvision creates its encoder
    (handle, state, its own stream: tens of ms) on first use, bound to the stream current then,
    which must be ours (see ``_side_stream``), not the default one."""
    assert _encode_jpeg_gpu is not None
    stream = _side_stream("jpeg", device)
    with torch.inference_mode(), torch.cuda.stream(stream):
        pixels = torch.full((3, 16, 16), 128, dtype=torch.uint8, device=device)
        _encode_jpeg_gpu([pixels], quality=90)[0].cpu()
