"""``livegen serve --ssl-certfile/--ssl-keyfile``: HTTPS and WSS served directly, with a
certificate this test makes (self-signed, for 127.0.0.1), trusted by the clients through
``SSL_CERT_FILE`` as a user would trust their own CA.

fal-client runs in a subprocess each time: the env-var route reads ``FAL_RUN_HOST`` when
fal_client is imported, and ``point_fal_client`` rebinds module globals; neither may leak into
the other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from click.testing import CliRunner

from livegen.cli import main
from tests.conftest import API_KEY, LiveServer, make_certificate, start_server, stop_server, wait_ready_tls


class Tls(NamedTuple):
    base: str  # https://127.0.0.1:PORT
    cert: Path  # the self-signed certificate the clients trust
    server: LiveServer


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory, shared_data_dir: Path) -> Iterator[Tls]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = make_certificate(folder)
    server = start_server(
        folder / "data",
        *("--weights", "tiny-random", "--device", "cpu", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)),
        synth_from=shared_data_dir,
        wait_ready=False,
    )
    base = server.base_url.replace("http://", "https://")
    wait_ready_tls(server, base, cert)
    yield Tls(base, cert, server)
    stop_server(server)


# A client that hangs prints every thread's stack (faulthandler) and exits before the test's own
# timeout, so a failure says where it waited (CI once saw one run out its 300 s with no output).
CLIENT_STACKS_AFTER_S = 150


def run_client(script: str, env: dict[str, str], server: LiveServer) -> dict[str, object]:
    full_env = {**os.environ, **env, "FAL_KEY": API_KEY}
    script = f"import faulthandler; faulthandler.dump_traceback_later({CLIENT_STACKS_AFTER_S}, exit=True)\n{script}"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=full_env)
    assert done.returncode == 0, f"{done.stderr[-6000:]}\nserver log:\n{server.log()[-3000:]}"
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


SMALL = '{"prompt": "a red fox", "model_name": "stabilityai/sd-turbo", "image_size": {"width": 64, "height": 64}}'


def test_plain_http_is_refused_and_https_is_served(tls: Tls) -> None:
    base, cert = tls.base, tls.cert
    assert httpx.get(base + "/healthz", verify=str(cert)).json() == {"status": "ok"}
    with pytest.raises(httpx.HTTPError):
        httpx.get(base.replace("https://", "http://") + "/healthz", timeout=5)
    with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate
        httpx.get(base + "/healthz")


def test_fal_client_by_environment_variables_alone(tls: Tls) -> None:
    """The README's route for code that cannot run anything before importing fal_client:
    FAL_RUN_HOST and FAL_QUEUE_RUN_HOST, over TLS (fal-client builds https:// and wss:// URLs)."""
    base, cert = tls.base, tls.cert
    host = base.removeprefix("https://")
    script = f"""
import json, fal_client
out = fal_client.run("fal-ai/fast-turbo-diffusion", {SMALL})
handle = fal_client.submit("fal-ai/fast-turbo-diffusion", {SMALL})
queued = handle.get()
with fal_client.realtime("fal-ai/fast-turbo-diffusion", use_jwt=False) as connection:
    connection.send({SMALL})
    frame = connection.recv()
print(json.dumps({{"run": out["images"][0]["width"], "queued": queued["images"][0]["width"],
                  "realtime": frame["images"][0]["width"]}}))
"""
    env = {"FAL_RUN_HOST": host, "FAL_QUEUE_RUN_HOST": host + "/queue", "SSL_CERT_FILE": str(cert)}
    result = run_client(script, env, tls.server)
    assert (result["run"], result["queued"], result["realtime"]) == (64, 64, 64)


def test_fal_client_pointed_at_an_https_base(tls: Tls) -> None:
    """point_fal_client with an https base: tokens, realtime over wss with a token, uploads."""
    base, cert = tls.base, tls.cert
    script = f"""
import json, fal_client
from livegen.client import point_fal_client
point_fal_client({base!r})
with fal_client.realtime("fal-ai/fast-turbo-diffusion") as connection:
    connection.send({SMALL})
    frame = connection.recv()
url = fal_client.upload(b"tls bytes", "text/plain")
print(json.dumps({{"realtime": frame["images"][0]["width"], "upload": url}}))
"""
    result = run_client(script, {"SSL_CERT_FILE": str(cert)}, tls.server)
    assert result["realtime"] == 64
    url = str(result["upload"])
    assert url.startswith(base + "/cdn/files/")
    assert httpx.get(url, verify=str(cert)).content == b"tls bytes"


@pytest.mark.parametrize(
    ("files", "said"),
    [
        (("cert",), "--ssl-certfile and --ssl-keyfile go together"),
        (("missing", "key"), "no such file"),
        (("key", "key"), "do not load"),  # a key where the certificate should be
    ],
)
def test_bad_tls_settings_are_usage_errors(tmp_path: Path, files: tuple[str, ...], said: str) -> None:
    cert, key = make_certificate(tmp_path)
    paths = {"cert": cert, "key": key, "missing": tmp_path / "nope.pem"}
    args = ["serve", "--data-dir", str(tmp_path / "data"), "--ssl-certfile", str(paths[files[0]])]
    if len(files) > 1:
        args += ["--ssl-keyfile", str(paths[files[1]])]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and said in result.output, result.output
