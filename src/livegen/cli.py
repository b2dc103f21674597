"""The ``livegen`` command: ``serve`` and ``keys``.

Every ``serve`` flag is also an environment variable ``LIVEGEN_<NAME>`` (read by ``Settings``);
a flag given on the command line wins. Heavy imports (torch, the server) happen inside the
commands, so ``livegen keys`` stays light.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from livegen import __version__
from livegen.protocol.schemas import MAX_SIDE, MAX_STEPS, MIN_SIDE


def _settings(**overrides: Any) -> Any:
    from livegen.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise click.UsageError(problems) from None


class IntList(click.ParamType):
    """Comma-separated integers, each within [minimum, maximum] (and a multiple of ``multiple_of``)."""

    name = "integers"

    def __init__(self, minimum: int, maximum: int, multiple_of: int = 1) -> None:
        self.minimum, self.maximum, self.multiple_of = minimum, maximum, multiple_of

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(int(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)
        if not numbers:
            self.fail("give at least one number", param, ctx)
        for n in numbers:
            if not self.minimum <= n <= self.maximum or n % self.multiple_of:
                multiple = f" and a multiple of {self.multiple_of}" if self.multiple_of > 1 else ""
                self.fail(f"{n} is not within {self.minimum}..{self.maximum}{multiple}", param, ctx)
        return numbers


_SIDES = IntList(minimum=MIN_SIDE, maximum=MAX_SIDE, multiple_of=8)


def _image_side(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """One image side the server accepts (``_SIDES``' check)."""
    return _SIDES.convert(str(value), param, ctx)[0]


def _check_tls(settings: Any) -> None:
    """Both TLS files or neither, and a certificate and key that load together: a usage error now,
    not uvicorn's traceback at start."""
    cert, key = settings.ssl_certfile, settings.ssl_keyfile
    if cert is None and key is None:
        return
    if cert is None or key is None:
        raise click.UsageError("--ssl-certfile and --ssl-keyfile go together: give both")
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise click.UsageError(f"cannot read {exc.filename}: no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise click.UsageError(f"--ssl-certfile {cert} and --ssl-keyfile {key} do not load: {exc}") from None


def _check_device(settings: Any) -> None:
    """``--device cuda`` where torch sees no CUDA device: a usage error now, not a failed model load."""
    if settings.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise click.UsageError(
            f"--device cuda, but torch {torch.__version__} ({build}) sees no CUDA device; use --device cpu or auto"
        )


def _check_data_dir(settings: Any) -> None:
    """The data dir exists (made if need be) and is writable: a clear error now, not a traceback."""
    folder = settings.data_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".livegen-write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise click.ClickException(f"cannot use the data dir {folder}: {exc.strerror or exc}") from None


class RedactSecrets(logging.Filter):
    """Rewrite records that carry secrets before any handler sees them:

    - uvicorn logs each WebSocket handshake with its path and query, where realtime tokens
      travel (``?fal_jwt_token=``);
    - httpx logs every request it sends at INFO with the full URL, and the query of an
      ``image_url`` or ``fal_webhook`` may be a presigned URL's signature: queries of absolute
      URLs are dropped whatever their parameters are called;
    - at DEBUG, websockets logs the handshake headers (``< authorization: Key ...``).
    """

    _TOKEN = re.compile(r"((?:fal_jwt_token|token|key)=)[^&\s\"']+", re.IGNORECASE)
    _URL_QUERY = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s?#\"']*\?)[^\s#\"']+", re.IGNORECASE)
    _HEADER = re.compile(
        r"^([<>] (?:authorization|proxy-authorization|cookie|set-cookie|x-fal-cdn-token):).*$",
        re.IGNORECASE | re.MULTILINE,
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self._URL_QUERY.sub(r"\1<redacted>", message)
        redacted = self._HEADER.sub(r"\1 <redacted>", redacted)
        redacted = self._TOKEN.sub(r"\1<redacted>", redacted)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


_REFUSED_HANDSHAKE = "ASGI callable returned without completing handshake."


class QuietRefusedHandshakes(logging.Filter):
    """uvicorn logs an ERROR after every WebSocket handshake the app refuses with an HTTP answer
    (fal's error body: bad token, wrong origin, server full), right after its own INFO line
    "connection rejected (403 Forbidden)". A refusal is not a server error, and anyone sending
    bad tokens could otherwise fill the error log: drop that line (the INFO line stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "uvicorn.error" and record.msg == _REFUSED_HANDSHAKE)


class QuietLibraryNoise(logging.Filter):
    """Two library warnings every start printed, about nothing livegen does:

    - diffusers warns on every module ``.to(dtype)`` that some modules "should be kept in
      float32", even when it lists none. ``from_pipe`` (the img2img and inpaint views of a loaded
      pipeline) always casts its modules to a dtype, their own: four such lines per model load.
      A warning that names modules still shows.
    - transformers warns that its CLIP image processor "requires torchvision (not installed)"
      when diffusers' pipelines import it. livegen never builds one (no safety checker, no
      feature extractor); torchvision is only its optional GPU JPEG decoder.
    """

    LOGGERS = ("diffusers.models.modeling_utils", "transformers.utils.import_utils")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("There are modules in ") and "should be kept in float32: []." in message:
            return False
        return "ImageProcessor` requires torchvision (not installed)" not in message


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactSecrets())
        handler.addFilter(QuietRefusedHandshakes())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    quiet_library_noise()


def quiet_library_noise() -> None:
    """``QuietLibraryNoise`` on the loggers it is for (once; the commands that load models)."""
    for name in QuietLibraryNoise.LOGGERS:
        noisy = logging.getLogger(name)
        if not any(isinstance(f, QuietLibraryNoise) for f in noisy.filters):
            noisy.addFilter(QuietLibraryNoise())


@click.group()
@click.version_option(__version__, prog_name="livegen")
def main() -> None:
    """livegen: real-time image generation speaking fal.ai's model API."""


@main.command()
@click.option("--host", help="Interface to bind. [env LIVEGEN_HOST; default 127.0.0.1]")
@click.option("--port", type=int, help="Port to bind. [env LIVEGEN_PORT; default 8000]")
@click.option(
    "--ssl-certfile",
    type=click.Path(path_type=Path),
    help="Serve HTTPS/WSS with this PEM certificate (chain). [env LIVEGEN_SSL_CERTFILE]",
)
@click.option(
    "--ssl-keyfile",
    type=click.Path(path_type=Path),
    help="The certificate's PEM private key. [env LIVEGEN_SSL_KEYFILE]",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    help="Keys, files, synthesized checkpoints. [env LIVEGEN_DATA_DIR; default ./.livegen]",
)
@click.option(
    "--weights",
    help="hub | random | tiny-random | PATH (a folder of diffusers folders). [env LIVEGEN_WEIGHTS; default hub]",
)
@click.option(
    "--models",
    help="Comma-separated models to load at start. [env LIVEGEN_MODELS; default stabilityai/sd-turbo]",
)
@click.option(
    "--load-on-demand/--no-load-on-demand",
    default=None,
    help="Load other models on first use, or refuse them. [env LIVEGEN_LOAD_ON_DEMAND; default on]",
)
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), help="[env LIVEGEN_DEVICE; default auto]")
@click.option(
    "--tiny-vae/--full-vae",
    default=None,
    help="Decode with TAESD/TAESDXL. [env LIVEGEN_TINY_VAE; default tiny on the GPU fast path, else full]",
)
@click.option(
    "--fast-path",
    type=click.Choice(["auto", "on", "off"]),
    help="The GPU fast path (own loop, CUDA graphs) or the plain diffusers pipelines. "
    "[env LIVEGEN_FAST_PATH; default auto: on for CUDA]",
)
@click.option(
    "--allow-private-urls",
    is_flag=True,
    default=None,
    help="Allow image_url fetches from loopback/private addresses. [env LIVEGEN_ALLOW_PRIVATE_URLS]",
)
@click.option(
    "--public-url",
    help="Base URL for returned file URLs. [env LIVEGEN_PUBLIC_URL; default: from each request]",
)
@click.option(
    "--allowed-origins",
    help="Comma-separated browser origins (scheme://host[:port]; * for any) allowed besides the server's own: "
    "on realtime WebSockets, and by CORS on HTTP. [env LIVEGEN_ALLOWED_ORIGINS]",
)
@click.option(
    "--max-sessions",
    type=click.IntRange(min=1),
    help="Concurrent WebSocket connections (realtime and HTTP over WebSocket). [env LIVEGEN_MAX_SESSIONS; default 64]",
)
@click.option("--log-level", default="INFO", show_default=True)
def serve(log_level: str, **flags: Any) -> None:
    """Serve fal's model API (HTTP) on HOST:PORT."""
    settings = _settings(**flags)
    from livegen.engine.registry import MODELS

    unknown = [m for m in settings.models if m not in MODELS]
    if unknown:
        raise click.UsageError(f"unknown model(s) in --models: {', '.join(unknown)}; known: {', '.join(MODELS)}")
    _check_device(settings)
    _check_data_dir(settings)
    _check_tls(settings)
    setup_logging(log_level)
    _ensure_a_key(settings)

    import asyncio

    import uvicorn

    from livegen.server.app import connection_options, create_app
    from livegen.server.routes import realtime

    server: uvicorn.Server | None = None

    def stop(_message: str) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=stop)

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT /readyz turns 503 at once, before uvicorn drains in-flight requests."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.draining = True
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: list[Any] | None = None) -> None:
            # Realtime sessions get 1012 with a reason (uvicorn would close them without one);
            # HTTP requests in flight then have drain_timeout_s to finish.
            await realtime.close_sessions(app)
            if settings.drain_grace_s > 0:
                # Still listening: /readyz says draining and new work is refused with 503 (see
                # DrainCutMiddleware) while a load balancer notices; in-flight requests go on.
                logging.getLogger("livegen.serve").info(
                    "draining: refusing new work for %.1f s before closing the socket", settings.drain_grace_s
                )
                await asyncio.sleep(settings.drain_grace_s)
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises the signal after a graceful shutdown (exit status -15); a
            # drained, clean stop exits 0 instead.
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        access_log=False,  # access lines would carry query strings, and realtime tokens travel there
        log_config=None,
        **connection_options(settings),
        timeout_graceful_shutdown=settings.drain_timeout_s,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
    )
    server = DrainingServer(config)
    server.run()
    fatal = app.state.fatal_error if hasattr(app.state, "fatal_error") else None
    if fatal:
        click.echo(f"livegen: could not start: {fatal}", err=True)
        sys.exit(1)


def _ensure_a_key(settings: Any) -> None:
    """With no key at all, create one and show it once (never through a logger)."""
    from livegen.server.auth import KeyStore
    from livegen.server.db import Database

    with Database.open(settings.db_path) as db:
        keys = KeyStore(db, settings.api_keys)
        if keys.has_any():
            return
        info, key = keys.create("default")
    click.echo(
        f"\nNo API key existed, so one was created (id {info.key_id}). It is shown only this once:\n\n"
        f"    FAL_KEY={key}\n\nManage keys with `livegen keys create|list|revoke`.\n",
        err=True,
    )


@main.group()
def keys() -> None:
    """Manage API keys (stored hashed in the data dir)."""


_data_dir = click.option(
    "--data-dir", type=click.Path(path_type=Path), help="[env LIVEGEN_DATA_DIR; default ./.livegen]"
)


@keys.command("create")
@click.option("--name", default="default", show_default=True)
@_data_dir
def keys_create(name: str, data_dir: Path | None) -> None:
    """Create a key and print it (shown only this once)."""
    from livegen.server.auth import KeyStore
    from livegen.server.db import Database

    settings = _settings(data_dir=data_dir)
    _check_data_dir(settings)
    with Database.open(settings.db_path) as db:
        info, key = KeyStore(db).create(name)
    click.echo(key)
    click.echo(f"created key id {info.key_id} ({name}); store it now, it cannot be shown again", err=True)


@keys.command("list")
@_data_dir
def keys_list(data_dir: Path | None) -> None:
    """List keys (ids and names; never the secrets)."""
    from livegen.server.auth import KeyStore
    from livegen.server.db import Database

    settings = _settings(data_dir=data_dir)
    _check_data_dir(settings)
    with Database.open(settings.db_path) as db:
        infos = KeyStore(db).list()
    for info in infos:
        created = dt.datetime.fromtimestamp(info.created_at, dt.UTC).isoformat(timespec="seconds")
        state = "revoked" if info.revoked_at else "active"
        click.echo(f"{info.key_id}\t{state}\t{created}\t{info.name}")


@keys.command("revoke")
@click.argument("key_id")
@_data_dir
def keys_revoke(key_id: str, data_dir: Path | None) -> None:
    """Revoke the key with this id."""
    from livegen.protocol.errors import NotFound
    from livegen.server.auth import KeyStore
    from livegen.server.db import Database

    settings = _settings(data_dir=data_dir)
    _check_data_dir(settings)
    with Database.open(settings.db_path) as db:
        try:
            KeyStore(db).revoke(key_id)
        except NotFound as exc:
            raise click.ClickException(exc.message) from None
    click.echo(f"revoked {key_id}")


@main.group(invoke_without_command=True)
@click.option("--model", default="stabilityai/sd-turbo", show_default=True)
@click.option("--weights", default="random", show_default=True, help="hub | random | tiny-random | PATH")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--task", type=click.Choice(["t2i", "i2i"]), default="t2i", show_default=True)
@click.option(
    "--size", type=_SIDES, default="512", show_default=True,
    help="Comma-separated square sizes, e.g. 512,768,1024.",
)  # fmt: skip
@click.option("--steps", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--strength", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True, help="i2i only")
@click.option(
    "--guidance", type=click.FloatRange(min=0), default=0.0, show_default=True,
    help="guidance_scale (> 1: classifier-free guidance)",
)  # fmt: skip
@click.option(
    "--batch", type=IntList(minimum=1, maximum=64), default="1,4,8,16", show_default=True,
    help="Comma-separated batch sizes.",
)  # fmt: skip
@click.option(
    "--iters", type=click.IntRange(min=1), default=5, show_default=True, help="Timed iterations per batch size."
)
@click.option(
    "--variant",
    default="default",
    show_default=True,
    help="Comma-separated livegen engine variants, each BASE[+MOD...]: BASE default (what serve does here) | "
    "plain (stock pipelines) | eager (fast path, no graphs) | graph (fast path + CUDA graphs) | compile "
    "(torch.compile in CUDA graphs) | compile-ro (torch.compile reduce-overhead); MOD bf16 | fp16 | fp32 | "
    "tiny-vae | full-vae | no-cl (without channels_last) | fuse-qkv (fused attention projections) | tuned "
    "(inductor flags, with compile) | dyn-batch (with compile: one compile for batches 2..16) | cudnn-bench "
    "(cuDNN times its convolution algorithms) | sdpa-cudnn (cuDNN's "
    "attention kernels first) | nhwc-gn (GroupNorms kept in channels_last) | split-geglu (GEGLU's value and gate "
    "projected apart) | taesd-relu (the tiny VAE's convolutions fused with their ReLU) | taesd-fold (its "
    "upsamplings folded into transposed convolutions) | keep-cl (activations kept channels_last: no NCHW "
    "transformer outputs, compiled skip concatenations laid out channels_last) | no-split-geglu | no-taesd-relu "
    "| no-taesd-fold | no-keep-cl (those four are on by default: each turned off) | no-rewrites (all four off) | "
    "no-text-graph (new prompts encoded eagerly) | fp8 (the UNet's transformer linears in float8) | no-fp8-geglu "
    "(with fp8: the GEGLUs' quantization by inductor or PyTorch ops, not livegen's kernel).",
)
@click.option(
    "--tiny-vae/--full-vae",
    default=None,
    help="livegen decodes with TAESD/TAESDXL. [default: tiny on the fast path, else full]",
)
@click.option("--baseline/--no-baseline", default=True, help="Also time stock diffusers.")
@click.option(
    "--streamdiffusion",
    is_flag=True,
    help="Also time StreamDiffusion's PyTorch pipeline doing the same work (SD-Turbo; needs "
    "`pip install --no-deps streamdiffusion==0.1.1`; no TensorRT).",
)
@click.option("--data-dir", type=click.Path(path_type=Path), help="Where synthesized checkpoints are cached.")
@click.option(
    "--new-prompts",
    is_flag=True,
    help="Give every livegen request a prompt not seen before, so each batch encodes its prompts (the "
    "embedding cache misses), as a session whose prompt follows its user's typing.",
)
@click.option(
    "--profile",
    is_flag=True,
    help="Also profile each livegen row (torch.profiler, --iters more batches): GPU kernel time by category "
    "(convolution, GEMM, attention, ...), kernels per batch, the engine's regions on eager rows.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def bench(
    ctx: click.Context,
    model: str,
    weights: str,
    device: str,
    task: str,
    size: tuple[int, ...],
    steps: int,
    strength: float,
    guidance: float,
    batch: tuple[int, ...],
    iters: int,
    variant: str,
    tiny_vae: bool | None,
    baseline: bool,
    streamdiffusion: bool,
    data_dir: Path | None,
    new_prompts: bool,
    profile: bool,
    as_json: bool,
) -> None:
    """Engine benchmark: livegen's engine and stock diffusers side by side (see also `bench realtime`)."""
    if ctx.invoked_subcommand is not None:
        return
    import json

    quiet_library_noise()

    from livegen.bench.engine import EngineBenchConfig, format_table, run_engine_bench, variant_settings

    settings = _settings(weights=weights, device=device, tiny_vae=tiny_vae, data_dir=data_dir, models=[model])
    _check_device(settings)
    _check_data_dir(settings)
    batches, sizes = batch, size
    variants = tuple(v.strip() for v in variant.split(",") if v.strip())
    for v in variants:
        try:
            variant_settings(settings, v)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    if streamdiffusion:
        from livegen.bench.streamdiffusion import StreamDiffusionUnavailable, check

        try:
            check(model)
        except StreamDiffusionUnavailable as exc:
            raise click.UsageError(str(exc)) from None
    config = EngineBenchConfig(
        model, task, sizes[0], steps, batches, iters, strength, baseline, sizes=sizes, variants=variants,
        guidance_scale=guidance, profile=profile, streamdiffusion=streamdiffusion, new_prompts=new_prompts,
    )  # fmt: skip
    from livegen.protocol.errors import InvalidInput

    try:
        report = run_engine_bench(settings, config)
    except InvalidInput as exc:  # work the engine refuses (i2i running no step, ...), said as the server says it
        raise click.UsageError(exc.message) from None
    click.echo(json.dumps(report, indent=2) if as_json else format_table(report))


@bench.command("realtime")
@click.option("--url", help="A running server's base URL. Without it, a server is started (see --weights).")
@click.option("--key", envvar="FAL_KEY", help="API key for --url. [env FAL_KEY]")
@click.option("--weights", default="tiny-random", show_default=True, help="For the server this command starts.")
@click.option("--device", default="auto", show_default=True, help="For the server this command starts.")
@click.option("--app", default="fal-ai/fast-turbo-diffusion", show_default=True)
@click.option("--model", default="stabilityai/sd-turbo", show_default=True)
@click.option("--sessions", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--fps", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
    help="Frames each session sends per second.",
)  # fmt: skip
@click.option(
    "--duration", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
    help="Seconds of sending.",
)  # fmt: skip
@click.option("--size", type=int, default=512, show_default=True, callback=_image_side)
@click.option(
    "--steps",
    type=click.IntRange(1, MAX_STEPS),
    help="[default: 1; with --image the fewest that run one step at --strength (diffusers runs int(steps x "
    "strength)): 2 at 0.5]",
)
@click.option(
    "--strength", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True, help="With --image."
)
@click.option("--image/--no-image", default=False, help="Send a --size image as a data URL (image-to-image).")
@click.option("--image-format", type=click.Choice(["jpeg", "png"]), default="jpeg", show_default=True)
@click.option("--max-buffering", type=click.IntRange(1, 60))
@click.option(
    "--new-prompts", is_flag=True,
    help="Every frame with a prompt the server has not seen (its embeddings are encoded, not cached), as a "
    "session whose prompt follows its user's typing.",
)  # fmt: skip
@click.option(
    "--warmup", type=click.FloatRange(min=0), default=0.0, show_default=True,
    help="Seconds of the same load first, not counted.",
)  # fmt: skip
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Data dir for the server this command starts, kept (its synthesized checkpoints and compile cache are "
    "reused). [default: a temporary one, removed at the end, that uses LIVEGEN_DATA_DIR's (./.livegen) synthesized "
    "checkpoints and compile cache]",
)
@click.option(
    "--null-engine",
    is_flag=True,
    help="Start the server in this process with an engine that answers at once (a flat JPEG): the server's own "
    "cost per frame (parsing, validation, input decode, packing, WebSocket), without generation.",
)
@click.option(
    "--simulated-device",
    type=click.Choice(["h200-graph", "h200-compile"]),
    help="Start the server and its engine in this process over a simulated device: each batch takes the time that "
    "card measured for its bucket (SD-Turbo t2i 512² 1 step, BENCHMARKS.md; other sizes, step counts, guidance, "
    "image-to-image and SDXL-Turbo scaled by a model) and "
    "returns a flat JPEG. The sessions, batching and scheduling are livegen's own: how frames become batches, "
    "measured on any machine.",
)
@click.option(
    "--max-batch-size", type=click.IntRange(1, 64), help="With --simulated-device: the engine's max batch size."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench_realtime(
    url: str | None,
    key: str | None,
    weights: str,
    device: str,
    app: str,
    model: str,
    sessions: int,
    fps: float,
    duration: float,
    size: int,
    steps: int | None,
    strength: float,
    image: bool,
    image_format: str,
    max_buffering: int | None,
    new_prompts: bool,
    warmup: float,
    data_dir: Path | None,
    null_engine: bool,
    simulated_device: str | None,
    max_batch_size: int | None,
    as_json: bool,
) -> None:
    """Drive realtime sessions like the clients do and report latency and throughput."""
    import asyncio
    import json

    from livegen.bench.realtime import BenchConfig, BenchSetupError, format_report, input_image_data_url, run_bench
    from livegen.engine import Task, unet_steps

    task = Task.IMAGE_TO_IMAGE if image else Task.TEXT_TO_IMAGE
    if steps is None:  # the fewest that run one UNet step
        steps = next((n for n in range(1, MAX_STEPS + 1) if unet_steps(task, n, strength) >= 1), MAX_STEPS)
    if unet_steps(task, steps, strength) < 1:
        raise click.UsageError(
            f"--steps {steps} at --strength {strength} runs no step (diffusers runs int(steps x strength)); "
            "raise --steps or --strength"
        )
    frame: dict[str, Any] = {"prompt": "a photo of a red fox in the snow", "model_name": model}
    frame.update(num_inference_steps=steps, sync_mode=True)
    if image:
        frame.update(image_url=input_image_data_url(size, image_format), strength=strength)
    else:
        frame["image_size"] = {"width": size, "height": size}
    if sum(map(bool, (null_engine, simulated_device, url))) > 1:
        raise click.UsageError("--url, --null-engine and --simulated-device each name the server: give one")
    if max_batch_size is not None and not simulated_device:
        raise click.UsageError("--max-batch-size goes with --simulated-device (a server's own: LIVEGEN_MAX_BATCH_SIZE)")
    server: contextlib.AbstractContextManager[tuple[str, str]]
    if null_engine or simulated_device:
        server = _in_process_bench_server(data_dir, simulated_device, max_batch_size)
    else:
        server = _bench_server(url, key, weights, device, model, data_dir)
    with server as (base_url, api_key):
        config = BenchConfig(
            base_url, api_key, app, sessions, fps, duration, frame, max_buffering,
            warmup_s=warmup, new_prompts=new_prompts,
        )  # fmt: skip
        try:
            report = asyncio.run(run_bench(config))
        except BenchSetupError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if report["misordered"]:
        sys.exit(1)


@contextlib.contextmanager
def _in_process_bench_server(
    data_dir: Path | None, simulated_device: str | None, max_batch_size: int | None
) -> Iterator[tuple[str, str]]:
    """The server in this process: over a simulated device, or the null engine."""
    import secrets

    api_key = secrets.token_urlsafe(16)
    with _bench_data_dir(data_dir, share_models=False) as folder:
        server: contextlib.AbstractContextManager[str]
        if simulated_device:
            from livegen.bench.simulated import simulated_server

            extra = {} if max_batch_size is None else {"max_batch_size": max_batch_size}
            server = simulated_server(folder, api_key, simulated_device, **extra)
        else:
            from livegen.bench.null_engine import null_server

            server = null_server(folder, api_key)
        with server as base_url:
            yield base_url, api_key


@contextlib.contextmanager
def _bench_data_dir(data_dir: Path | None, *, share_models: bool) -> Iterator[Path]:
    """The data dir of a server that ``bench realtime`` starts: ``data_dir`` as given (kept), or a
    temporary one, removed when the bench ends. With ``share_models`` the temporary one's
    synthesized checkpoints and compile cache are links to the configured data dir's
    (``LIVEGEN_DATA_DIR``, ./.livegen), as ``livegen bench`` and ``serve`` use them: random weights
    are synthesized and shapes compiled once, not on every run, and nothing large is left behind.
    The server's own state (keys, database, files) stays in the temporary folder."""
    if data_dir is not None:
        yield data_dir
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="livegen-bench-") as tmp:
        folder = Path(tmp)
        if share_models:
            configured = _settings()
            for shared in (configured.synth_dir, configured.compile_cache_dir):
                shared.mkdir(parents=True, exist_ok=True)
                # A link: removing the temporary folder unlinks it and leaves what it points to.
                (folder / shared.name).symlink_to(shared.resolve(), target_is_directory=True)
        yield folder


def _warm_up_progress(readyz: dict[str, Any]) -> str:
    """One line from a warming-up server's /readyz: the models' states and, with the fast path,
    its graphs and compiled shapes so far."""
    parts = [f"status {readyz.get('status')}"]
    parts += [f"{model} {state}" for model, state in (readyz.get("models") or {}).items() if state != "not loaded"]
    for model, fast in (readyz.get("fast_path") or {}).items():
        parts.append(
            f"{model}: {fast.get('graphs', 0)} graphs, {fast.get('compiled_shapes', 0)} shapes compiled "
            f"({fast.get('compile_s', 0.0):.0f} s)"
        )
    return "; ".join(parts)


@contextlib.contextmanager
def _bench_server(
    url: str | None, key: str | None, weights: str, device: str, model: str, data_dir: Path | None = None
) -> Iterator[tuple[str, str]]:
    if url:
        if not key:
            raise click.UsageError("--key (or FAL_KEY) is needed with --url")
        yield url.rstrip("/"), key
        return
    import os
    import secrets
    import subprocess
    import time

    import httpx

    from livegen.bench import free_port

    port = free_port()
    api_key = secrets.token_urlsafe(16)
    with _bench_data_dir(data_dir, share_models=True) as folder:
        env = {**os.environ, "LIVEGEN_API_KEYS": api_key}
        cmd = [sys.executable, "-m", "livegen", "serve", "--port", str(port), "--data-dir", str(folder),
               "--weights", weights, "--device", device, "--models", model, "--log-level", "WARNING"]  # fmt: skip
        process = subprocess.Popen(cmd, env=env)
        base_url = f"http://127.0.0.1:{port}"
        try:
            started = time.monotonic()
            deadline, next_report = started + 900, started + 15
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise click.ClickException("the server exited before it was ready")
                with contextlib.suppress(httpx.HTTPError):
                    ready = httpx.get(base_url + "/readyz", timeout=2)
                    if ready.status_code == 200:
                        break
                    if time.monotonic() >= next_report:  # a long warm-up (torch.compile) says where it is
                        next_report += 15
                        click.echo(f"server not ready after {time.monotonic() - started:.0f} s: "
                                   f"{_warm_up_progress(ready.json())}", err=True)  # fmt: skip
                time.sleep(0.3)
            else:
                raise click.ClickException("the server was not ready in 15 minutes")
            click.echo(f"server ready in {time.monotonic() - started:.1f} s", err=True)
            yield base_url, api_key
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
