"""The ``livegen`` command: ``serve`` and ``keys``.

Every ``serve`` flag is also an environment variable ``LIVEGEN_<NAME>`` (read by ``Settings``);
a flag given on the command line wins. Heavy imports (torch, the server) happen inside the
commands, so ``livegen keys`` stays light.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from livegen import __version__


def _settings(**overrides: Any) -> Any:
    from livegen.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise click.UsageError(problems) from None


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", force=True)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


@click.group()
@click.version_option(__version__, prog_name="livegen")
def main() -> None:
    """livegen: real-time image generation speaking fal.ai's model API."""


@main.command()
@click.option("--host", help="Interface to bind. [env LIVEGEN_HOST; default 127.0.0.1]")
@click.option("--port", type=int, help="Port to bind. [env LIVEGEN_PORT; default 8000]")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    help="Keys, files, synthesized checkpoints. [env LIVEGEN_DATA_DIR; default ./.livegen]",
)
@click.option(
    "--weights",
    help="hub | random | tiny-random | PATH (a folder of diffusers folders). "
    "[env LIVEGEN_WEIGHTS; default hub]",
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
@click.option(
    "--device", type=click.Choice(["auto", "cuda", "cpu"]), help="[env LIVEGEN_DEVICE; default auto]"
)
@click.option(
    "--tiny-vae/--full-vae",
    default=None,
    help="Decode with TAESD/TAESDXL. [env LIVEGEN_TINY_VAE; default full]",
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
@click.option("--log-level", default="INFO", show_default=True)
def serve(log_level: str, **flags: Any) -> None:
    """Serve fal's model API (HTTP) on HOST:PORT."""
    settings = _settings(**flags)
    from livegen.engine.registry import MODELS

    unknown = [m for m in settings.models if m not in MODELS]
    if unknown:
        raise click.UsageError(
            f"unknown model(s) in --models: {', '.join(unknown)}; known: {', '.join(MODELS)}"
        )
    setup_logging(log_level)
    _ensure_a_key(settings)

    import uvicorn

    from livegen.server.app import create_app

    server: uvicorn.Server | None = None

    def stop(_message: str) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=stop)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False, log_config=None)
    server = uvicorn.Server(config)
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
    with Database.open(settings.db_path) as db:
        try:
            KeyStore(db).revoke(key_id)
        except NotFound as exc:
            raise click.ClickException(exc.message) from None
    click.echo(f"revoked {key_id}")
