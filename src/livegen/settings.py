"""Settings: the only place livegen reads its environment (``LIVEGEN_*``).

``livegen serve`` builds one ``Settings`` from the environment, applies its flags over it and
passes the object down; tests build ``Settings(...)`` directly::

    settings = Settings(weights="tiny-random", data_dir=tmp_path, api_keys="k1")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from livegen.protocol.schemas import MAX_IMAGES, MAX_SIDE, MAX_STEPS, MIN_SIDE

WeightsSource = str  # "hub" | "random" | "tiny-random" | a folder path

# The fast path's four rewrites that are on by default since session 22 (each a setting below): the
# bench's no-rewrites and the GPU suite's one-rewrite-at-a-time cases turn these off.
DEFAULT_REWRITES = ("split_geglu", "keep_channels_last", "tiny_vae_conv_relu", "tiny_vae_fold_upsample")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIVEGEN_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)  # 0: any free port
    # HTTPS and WSS served directly (a GPU box on a LAN: browsers open cameras only on https or
    # localhost, and fal-client's FAL_RUN_HOST speaks https only): a PEM certificate (chain) and its key.
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    data_dir: Path = Path(".livegen")
    # hub: real checkpoints by Hugging Face id; PATH: a folder with one diffusers folder per
    # model; random / tiny-random: synthesized checkpoints (see engine/synth.py).
    weights: WeightsSource = "hub"
    # Models loaded at start. Others load on first use when load_on_demand, else are refused.
    models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["stabilityai/sd-turbo"])
    load_on_demand: bool = True
    # gc.freeze() once the models are loaded (and after each later load): full collections then
    # skip the ~550,000 objects of torch, diffusers and the models (~330 ms -> ~2 ms on a small CPU).
    gc_freeze: bool = True
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # Decode latents with the tiny VAE (TAESD / TAESDXL). None: tiny on the fast path (where a
    # request may still ask for the full VAE), full on the plain diffusers pipelines.
    tiny_vae: bool | None = None
    # The GPU fast path (engine/fastpath.py): auto = on for CUDA, off on a CPU.
    fast_path: Literal["auto", "on", "off"] = "auto"
    # Fast path: replay CUDA graphs per (model, task, size, steps, bucket); torch.compile mode
    # (off, or inductor's mode; compiling costs ~100 s per shape on an H100, cached in the data dir).
    cuda_graphs: bool = True
    # The fast path's UNet/VAE in channels_last memory format on CUDA (convolutions' preferred layout).
    channels_last: bool = True
    # With channels_last: GroupNorms computed in the NHWC layout (fastpath.group_norm_nhwc) instead of
    # PyTorch's CUDA GroupNorm, which converts to NCHW and back around each one. Off: on an H200 (session 8,
    # BENCHMARKS.md) 3 % less device time at batch 16 and 13 % more at batch 1.
    nhwc_group_norm: bool = False
    # The fast path's four rewrites below are on by default since session 22: each was timed on an H200
    # (session 20) and matched the plain pipeline there within 1 level of 255 (tests/gpu, session 22,
    # 69-73 dB; BENCHMARKS.md). Each can be turned off on its own (the bench's no-* modifiers time that).
    # Fast path with channels_last, batches of 2+: the UNet's activations stay channels_last (engine/layout.py):
    # its transformer blocks return channels_last views instead of diffusers' NCHW copies, and under
    # torch_compile its skip concatenations are laid out channels_last, so no compiled kernel reads or
    # writes across layouts (compiled batch 16: -13 % per image).
    keep_channels_last: bool = True
    # Fast path: the UNet's GEGLU feed-forwards project value and gate with two matmuls, so the
    # gelu and the product run vectorized on contiguous halves (fastpath.split_geglu).
    split_geglu: bool = True
    # Fast path on a GPU with float8 matmuls (compute capability 8.9 or 9.0+): the UNet's transformer
    # linear layers (attention projections, feed-forwards) with float8 weights and per-token float8
    # inputs (engine/fp8.py). Images move by more than the fp16 fast path's tolerance (tests/gpu
    # measures how much); the plain pipelines share the UNet and use it too. Off: a choice of speed over
    # fidelity, and on an H200 not yet faster (session 22: compiled batch 16 2.18 ms/img, as without it;
    # under graphs even; BENCHMARKS.md).
    fp8_linear: bool = False
    # With fp8_linear on CUDA (float16, Triton present): each GEGLU feed-forward's GELU, product and
    # per-row float8 quantization in one kernel that reads each row once (engine/fp8_geglu.py), where
    # inductor's code reads it twice (session 22: 3.29 ms of the compiled batch 16 on an H200).
    # Checked against the PyTorch ops at load; a failure there: a warning and the ops. Not yet timed.
    fp8_geglu_kernel: bool = True
    # Fast path: the tiny VAE's residual blocks as cuDNN convolutions with the ReLU and residual add
    # fused in (engine/tiny_vae.py), and its decoder's nearest upsample + convolution pairs as one
    # transposed convolution. Under graphs, with split_geglu, batch 16 went from 4.35 to 3.75 ms/img.
    tiny_vae_conv_relu: bool = True
    tiny_vae_fold_upsample: bool = True
    torch_compile: Literal["off", "default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "off"
    # Fast path: the diffusers docs' inductor settings for UNets (1x1 convolutions as matmuls,
    # coordinate-descent tuning; compiling takes longer). Only with torch_compile.
    compile_tuning: bool = False
    # With torch_compile: compile shapes first seen after warm-up too (each stalls its batch for
    # ~100 s on an H100). Off: those run as uncompiled CUDA graphs, and a warning names them.
    compile_on_demand: bool = False
    # With torch_compile: the batch dimension is compiled as dynamic, so buckets 2..16 share one
    # compile per (size, steps, CFG, VAE) instead of one each (batch 1 is always its own); a bucket
    # first seen after warm-up reuses it rather than running uncompiled.
    compile_dynamic_batch: bool = False
    # With torch_compile: more inductor settings for the fast path's compiles, a JSON object such as
    # {"split_reductions": false} (torch.compile's options, on top of the mode's; part of inductor's
    # cache key). For trying inductor's knobs on a GPU without a code change; checked at start
    # against inductor's own settings (name and type).
    inductor_options: Annotated[dict[str, bool | int | float | str], NoDecode] = Field(default_factory=dict)
    # Fast path: one fused QKV (self-attention) / KV (cross-attention) projection per attention
    # layer instead of three or two matmuls; the weights are shared, no extra memory.
    fuse_qkv: bool = False
    # Fast path: cuDNN times its convolution algorithms for each new shape (during the warm-up
    # runs before a graph capture) instead of picking one by heuristics.
    cudnn_benchmark: bool = False
    # Fast path: scaled-dot-product attention tries cuDNN's kernels first, then flash (PyTorch's
    # default order puts flash first).
    sdpa_cudnn: bool = False
    # Fast path on CUDA: image-to-image input JPEGs that need no resize (realtime frames sent at the
    # output size) are decoded on the GPU (torchvision's nvjpeg) instead of by Pillow on a CPU core
    # (engine/device_decode.py). Off by default: inputs are untrusted bytes, and a decoder fault
    # inside CUDA would take down the context every session shares; Pillow's costs ~1 ms of a core.
    gpu_jpeg_decode: bool = False
    # Fast path on CUDA with graphs: a new prompt's text encoding replays a CUDA graph of each text
    # encoder instead of launching its ~500 (SDXL: ~970) ops eagerly (engine/text_graph.py). The same
    # computation; off only to compare (BENCHMARKS.md, session 17).
    text_encoder_graph: bool = True
    # Weights' dtype on CUDA (a CPU always runs float32).
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    # Fast path: batches are padded up to the next bucket, so batching never recaptures.
    batch_buckets: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [1, 2, 4, 8, 16])
    # Fast path: shapes rendered once at start (graphs captured, kernels chosen) for the
    # models loaded at start, with each family's default steps for text- and image-to-image.
    warmup_sizes: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["512x512"])
    warmup_buckets: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [1])
    allow_private_urls: bool = False
    # Comma-separated static API keys, accepted besides the managed ones in the data dir.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # Public base URL used in returned file URLs (e.g. https://gen.example.com/prefix). When
    # empty, URLs are built from each request's own Host and scheme.
    public_url: str = ""

    max_batch_size: int = Field(default=8, ge=1, le=64)
    # Fast path: a batch is padded up to the next bucket only when it fills at least this share
    # of it; otherwise it is cut to the largest bucket it fills and the rest goes in the next
    # batch (6 frames: 4 now and 2 next, not 8 rows of work for 6). 1: never padded but for a
    # single request of more images; 0.5 or less: always padded. BENCHMARKS.md, session 16.
    batch_fill: float = Field(default=1.0, ge=0, le=1)
    # Fast path on CUDA: while the device is busy, the next batch is formed just before the
    # device needs it (from measured device times), not as soon as a batch slot frees, so
    # frames that arrive meanwhile join it.
    batch_gather: bool = True
    # Realtime frames run first, then sync requests, then queued jobs; work that has waited this
    # long behind a higher priority takes the next batch, then none until this long after that
    # batch is done, so busy realtime sessions (or a stream of sync requests) do not hold the rest
    # back for as long as they run, and keep the device at least this long between such batches.
    priority_wait_s: float = Field(default=0.5, gt=0)
    prompt_cache_size: int = Field(default=256, ge=0)
    # Caps a server may set below the schema's bounds (which /openapi.json shows); 422 beyond.
    max_image_side: int = Field(default=MAX_SIDE, ge=MIN_SIDE, le=MAX_SIDE, description="Cap on output sides")
    max_num_images: int = Field(default=MAX_IMAGES, ge=1, le=MAX_IMAGES, description="Cap on num_images")
    max_inference_steps: int = Field(default=MAX_STEPS, ge=1, le=MAX_STEPS, description="Cap on num_inference_steps")
    # JSON request bodies (uploads have their own limits); a 20 MB image as a data URL is ~27 MB.
    max_request_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    max_input_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_input_image_pixels: int = Field(default=4096 * 4096, ge=64 * 64)
    fetch_timeout_s: float = Field(default=10.0, gt=0)
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    # Generation requests (run, stream, submit) per second per API key; 0 = unlimited.
    rate_limit_per_key: float = Field(default=0.0, ge=0)
    rate_limit_burst: int = Field(default=20, ge=1)
    drain_timeout_s: float = Field(default=30.0, gt=0, description="How long SIGTERM waits for in-flight requests")
    keep_alive_timeout_s: int = Field(
        default=75, ge=1, description="Idle HTTP keep-alive connections are closed after this many seconds"
    )
    # After SIGTERM, keep the listening socket open this long before draining: /readyz answers 503
    # and new work 503 shutting_down, so a load balancer takes the server out before it goes.
    drain_grace_s: float = Field(default=0.0, ge=0, le=300, description="Seconds /readyz shows 503 before draining")
    max_queued: int = Field(default=1000, ge=1, description="Queue length cap (429 beyond it)")
    max_running_jobs: int = Field(default=8, ge=1, description="Queue jobs handed to the engine at once")
    max_pending_sync: int = Field(
        default=64, ge=1, description="Sync requests (run, stream) in flight at once; 503 server_overloaded beyond"
    )
    results_ttl_s: float = Field(default=7 * 24 * 3600, gt=0, description="How long finished jobs are kept")
    files_ttl_s: float = Field(
        default=7 * 24 * 3600, gt=0, description="How long stored files (uploads, sync_mode false outputs) are served"
    )
    webhook_max_attempts: int = Field(default=10, ge=1)
    webhook_backoff_base_s: float = Field(default=15.0, gt=0)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    max_sessions: int = Field(default=64, ge=1, description="Concurrent WebSocket connections (realtime, HTTP over WS)")
    session_timeout_s: float = Field(default=60.0, gt=0, description="Idle realtime sessions get TIMEOUT")
    # 1: every newer frame replaces the one waiting, so a busy GPU renders each session's newest
    # frame (BENCHMARKS.md session 15: 16 sessions p50 -33 ms against 2, same frames/s)
    default_max_buffering: int = Field(default=1, ge=1, le=60, description="Realtime inbox size without ?max_buffering")
    max_session_fps: float = Field(default=60.0, gt=0, description="Frames a realtime session may start per second")
    max_ws_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # permessage-deflate on realtime WebSockets. Off: frames and results are mostly JPEG/PNG bytes,
    # which do not compress, and deflating them costs ~1 ms of the event loop per message pair.
    ws_compression: bool = False
    # Browser origins allowed besides the server's own ("*": any): on the realtime WebSocket, and by CORS on HTTP.
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_token_ttl_s: int = Field(default=3600, ge=1, description="Cap on realtime/CDN token lifetimes")
    key_check_s: float = Field(
        default=5.0, gt=0, description="How often open realtime sessions re-check that their API key is not revoked"
    )
    max_upload_bytes: int = Field(default=1024**3, ge=1, description="Cap on one uploaded file (413 beyond)")
    max_upload_part_bytes: int = Field(default=100 * 1024**2, ge=1, description="Cap on one multipart part")
    upload_expiry_s: float = Field(default=3600, gt=0, description="Unfinished uploads are deleted after this")

    @field_validator(
        "models", "api_keys", "allowed_origins", "batch_buckets", "warmup_sizes", "warmup_buckets", mode="before"
    )
    @classmethod
    def _split_commas(cls, v: object) -> object:
        """Lists come from flags and env vars as comma-separated strings."""
        if isinstance(v, str):
            return [item.strip() for item in v.split(",") if item.strip()]
        return v

    @field_validator("batch_buckets", "warmup_buckets")
    @classmethod
    def _check_buckets(cls, v: list[int]) -> list[int]:
        if not v or not all(1 <= b <= 64 for b in v):
            raise ValueError(f"batch sizes from 1 to 64, at least one; got {v}")
        return v

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, v: str) -> str:
        """Empty (each request's own base URL), or an absolute http(s) URL: returned file URLs start
        with it, so a relative or scheme-less value would give clients URLs they cannot fetch."""
        v = v.strip()
        if v:
            parts = urlsplit(v)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"--public-url must be an absolute http(s) URL (https://gen.example.com); got {v!r}")
        return v

    @field_validator("allowed_origins")
    @classmethod
    def _check_origins(cls, v: list[str]) -> list[str]:
        """``*``, or origins as a browser sends them (scheme://host[:port], lower case, no path): the
        check is an exact match, so ``http://localhost:5173/`` would never have matched."""
        origins = []
        for origin in v:
            parts = urlsplit(origin)
            if origin != "*" and (
                not parts.scheme or not parts.netloc or parts.path not in ("", "/") or parts.query or parts.fragment
            ):
                raise ValueError(f"an allowed origin is * or scheme://host[:port]; got {origin!r}")
            origins.append(origin if origin == "*" else f"{parts.scheme}://{parts.netloc}".lower())
        return origins

    @field_validator("inductor_options", mode="before")
    @classmethod
    def _parse_inductor_options(cls, v: object) -> object:
        """From the environment: a JSON object (parsed here, so that a malformed one is a validation
        error like any other, not pydantic-settings' parse failure)."""
        if isinstance(v, str):
            try:
                v = json.loads(v) if v.strip() else {}
            except ValueError:
                raise ValueError('must be a JSON object, e.g. {"split_reductions": false}') from None
        return v

    @field_validator("inductor_options")
    @classmethod
    def _check_inductor_options(cls, v: dict[str, object]) -> dict[str, object]:
        """torch.compile's own check of its options (names and types), here at start rather than at
        the first compile, in the warm-up."""
        if not v:
            return v
        import torch  # only when set

        for key, value in v.items():
            try:
                torch._TorchCompileInductorWrapper(None, {key: value}, False)
            except RuntimeError as exc:
                why = "inductor has no such setting" if "Unexpected optimization option" in str(exc) else str(exc)
                raise ValueError(f"LIVEGEN_INDUCTOR_OPTIONS {key!r}: {why}") from None
        return v

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, v: str) -> str:
        if v in ("hub", "random", "tiny-random"):
            return v
        if not Path(v).expanduser().is_dir():
            raise ValueError(f"--weights must be hub, random, tiny-random or an existing folder; got {v!r}")
        return str(Path(v).expanduser().resolve())

    @property
    def db_path(self) -> Path:
        return self.data_dir / "livegen.sqlite3"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def secret_path(self) -> Path:
        return self.data_dir / "secret.key"

    @property
    def webhook_key_path(self) -> Path:
        return self.data_dir / "webhook-ed25519.pem"

    @property
    def synth_dir(self) -> Path:
        return self.data_dir / "synth"

    @property
    def compile_cache_dir(self) -> Path:
        return self.data_dir / "compile-cache"

    @field_validator("warmup_sizes")
    @classmethod
    def _check_sizes(cls, v: list[str]) -> list[str]:
        for size in v:
            w, _, h = size.lower().partition("x")
            if not (w.isdigit() and h.isdigit()):
                raise ValueError(f"warm-up sizes are WIDTHxHEIGHT, got {size!r}")
        return v
