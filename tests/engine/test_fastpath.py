"""The fast path renders what the plain diffusers pipelines render (CPU, tiny random weights).

Tolerance, measured on this suite's inputs (torch 2.13 CPU, fp32, 64x64, three seeds each):

- tiny VAE (TAESD/TAESDXL): identical pixels for every case (sd-turbo t2i/i2i, sdxl-turbo
  t2i 1 and 3 ancestral steps and i2i, LCM 4 steps with CFG and i2i). The fast path runs the
  schedulers' arithmetic operation for operation, in the same dtypes, with the same random
  draws per generator, so fp32 on a CPU leaves nothing to differ.
- full VAE (AutoencoderKL): at most 1 level of 255 on at most 0.01% of pixels. The plain
  img2img pipelines encode image by image while the fast path encodes the batch at once, and
  a few values land on the other side of a rounding boundary.

So the assertion below is: max |difference| <= 1 level and <= 0.1% of pixels differ. On a GPU
in fp16 the same comparison is looser (see tests/gpu/test_fastpath_gpu.py).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from livegen.engine import DeviceImage, EncodedImage, GenerationRequest, Task
from livegen.engine.fastpath import Deferred
from livegen.engine.worker import Worker
from livegen.settings import Settings

SD, SDXL, LCM = "stabilityai/sd-turbo", "stabilityai/sdxl-turbo", "runwayml/stable-diffusion-v1-5"
MAX_LEVELS = 1
MAX_DIFFERING = 0.001


@pytest.fixture(scope="module")
def settings(shared_data_dir: Path) -> Settings:
    return Settings(weights="tiny-random", device="cpu", data_dir=shared_data_dir, fast_path="on")


@pytest.fixture(scope="module")
def adapters(settings: Settings) -> dict[str, Any]:
    worker = Worker(settings)
    return {m: worker._load(m) for m in (SD, SDXL, LCM)}


def input_image(size: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))


def req(model: str, seed: int = 1, **kw: Any) -> GenerationRequest:
    base: dict[str, Any] = dict(
        model_id=model, task=Task.TEXT_TO_IMAGE, prompt="a fox in the snow", width=64, height=64,
        num_inference_steps=1, guidance_scale=0.0, seed=seed, output_format="png",
    )  # fmt: skip
    base.update(kw)
    if base["task"] is Task.IMAGE_TO_IMAGE:
        base.setdefault("image", input_image(base["width"]))
    return GenerationRequest(**base)


def pixels(outputs: Any) -> list[np.ndarray]:
    if isinstance(outputs, Deferred):
        outputs = outputs.result()
    out = []
    for images in outputs:
        for im in images:
            assert not isinstance(im, EncodedImage)  # PIL on a CPU
            out.append(np.asarray(im))
    return out


@contextmanager
def plain(adapter: Any, vae: str) -> Iterator[None]:
    """The same loaded modules through the stock pipelines (fast path off), with ``vae``."""
    fast = adapter.fast
    pipes = (adapter.t2i, adapter.i2i)
    full = adapter.t2i.vae
    adapter.fast = None
    if vae == "tiny":
        for p in pipes:
            p.vae = fast.tiny_vae
    try:
        yield
    finally:
        adapter.fast = fast
        for p in pipes:
            p.vae = full


def assert_close(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        diff = np.abs(x.astype(int) - y.astype(int))
        assert diff.max() <= MAX_LEVELS, diff.max()
        assert (diff > 0).mean() <= MAX_DIFFERING, (diff > 0).mean()
        assert x.std() > 1  # not a blank image matching a blank image


CASES = [
    pytest.param(SD, {}, id="sd-turbo-t2i-1-step"),
    pytest.param(SD, {"task": Task.IMAGE_TO_IMAGE, "num_inference_steps": 2, "strength": 0.5}, id="sd-turbo-i2i"),
    pytest.param(SDXL, {}, id="sdxl-turbo-t2i-1-step"),
    pytest.param(SDXL, {"num_inference_steps": 3}, id="sdxl-turbo-t2i-3-ancestral-steps"),
    pytest.param(SDXL, {"task": Task.IMAGE_TO_IMAGE, "num_inference_steps": 4, "strength": 0.5}, id="sdxl-i2i"),
    pytest.param(LCM, {"num_inference_steps": 4, "guidance_scale": 1.5}, id="lcm-4-steps-cfg"),
    pytest.param(LCM, {"task": Task.IMAGE_TO_IMAGE, "num_inference_steps": 4, "strength": 0.6}, id="lcm-i2i-4x0.6"),
]


@pytest.mark.parametrize("vae", ["tiny", "full"])
@pytest.mark.parametrize(("model", "kw"), CASES)
def test_fast_path_matches_plain_pipeline(adapters: dict[str, Any], model: str, kw: dict[str, Any], vae: str) -> None:
    adapter = adapters[model]
    batch = [req(model, seed=s, vae=vae, **kw) for s in (1, 2)]
    fast = pixels(adapter(batch))
    with plain(adapter, vae):
        reference = pixels(adapter(batch))
    assert_close(fast, reference)


def test_bucket_padding_gives_the_single_runs_images(adapters: dict[str, Any]) -> None:
    adapter = adapters[SD]
    padded_before = adapter.fast.stats.padded_rows
    batch = [req(SD, seed=s, vae="tiny") for s in (5, 6, 7)]
    together = pixels(adapter(batch))  # 3 rows, padded to the bucket of 4
    assert adapter.fast.stats.padded_rows == padded_before + 1
    alone = [pixels(adapter([r]))[0] for r in batch]
    assert_close(together, alone)
    assert not np.array_equal(together[0], together[1])  # seeds differ, so do images


def test_num_images_crop_and_chunks_beyond_the_largest_bucket(adapters: dict[str, Any]) -> None:
    adapter = adapters[SD]
    buckets = adapter.fast.options
    r = req(SD, seed=3, vae="tiny", num_images=3, crop_to=(48, 40))
    try:
        adapter.fast.options = type(buckets)(buckets=(1, 2))  # 3 rows: one chunk of 2, one of 1
        deferred = adapter([r])
        out = pixels(deferred)
    finally:
        adapter.fast.options = buckets
    assert [im.shape for im in out] == [(40, 48, 3)] * 3
    # The chunks' host time adds up in the batch's stages (no CUDA events on a CPU: no device time).
    assert deferred.marks["inputs_s"] > 0 and deferred.marks["launch_s"] > 0
    assert "device_s" not in deferred.marks
    # image i of a request uses seed + i, as on the plain path
    alone = pixels(adapter([req(SD, seed=4, vae="tiny", crop_to=(48, 40))]))
    assert_close(out[1:2], alone)


def test_worker_serves_on_the_fast_path_with_warm_up(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    s = settings.model_copy(update={"models": [SD], "warmup_sizes": ["64x64"], "warmup_buckets": [1, 2]})
    caplog.set_level(logging.INFO, logger="livegen.engine.worker")
    with Worker.start(s) as worker:
        worker.startup.result(timeout=300)
        futures = [worker.submit(req(SD, seed=i, output_format="jpeg")) for i in range(3)]
        results = [f.result(timeout=300) for f in futures]
        status = worker.status()
    assert all(r.images[0].content_type == "image/jpeg" and r.images[0].data[:2] == b"\xff\xd8" for r in results)
    assert status["timings"]["warmup_s"] > 0 and status["timings"]["time_to_ready_s"] >= status["timings"]["load_s"]
    assert SD in status["fast_path"]
    # The warm-up says what it did, per model (t2i and i2i at 64x64, buckets 1 and 2: 4 shapes; a CPU captures none).
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"warm-up of {SD}")]
    assert len(lines) == 1 and re.fullmatch(
        rf"warm-up of {SD}: 4 shapes in [0-9.]+ s \(CUDA graphs captured: 0, shapes compiled: 0\)", lines[0]
    ), lines


def storage_bytes(module: Any) -> int:
    """Bytes of the distinct storages behind a module's parameters (views count once)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}
    return sum(storages.values())


@pytest.mark.parametrize("model", [SD, SDXL])
def test_fused_qkv_renders_the_same_images_in_the_same_memory(
    settings: Settings, adapters: dict[str, Any], model: str
) -> None:
    fused = Worker(settings.model_copy(update={"fuse_qkv": True}))._load(model)
    unet, unfused = fused.t2i.unet, adapters[model].t2i.unet
    layers = [m for m in unet.modules() if getattr(m, "fused_projections", False)]
    assert layers and all(hasattr(m, "to_qkv") or hasattr(m, "to_kv") for m in layers)
    assert sum(p.numel() for p in unet.parameters()) > sum(p.numel() for p in unfused.parameters())
    assert storage_bytes(unet) == storage_bytes(unfused)  # the separate projections are views now
    batch = [req(model, seed=s, vae="tiny") for s in (1, 2)]
    out = pixels(fused(batch))
    with plain(adapters[model], "tiny"):
        reference = pixels(adapters[model](batch))
    assert_close(out, reference)


def test_compile_allows_a_shape_per_bucket_size_and_step_count(settings: Settings) -> None:
    """torch.compile specializes per shape (dynamic=False); dynamo's default limit of 8 recompiles
    per function would quietly send the 9th shape (e.g. 5 buckets x 2 sizes) back to eager."""
    import torch._dynamo.config as dynamo_config

    # dynamo's own patch(), not monkeypatch: pytest 9.2 undoes a module attribute with delattr,
    # which hides the config entry for the rest of the session.
    with dynamo_config.patch(recompile_limit=8):
        fast = Worker(settings.model_copy(update={"torch_compile": "default"}))._load(SD).fast
        fast._compile()  # wraps the UNet and VAE calls; nothing is compiled until they run
        assert dynamo_config.recompile_limit >= 5 * 3 * 2 * 2  # buckets x sizes x tasks x cfg
        assert hasattr(fast._compiled_unet, "_torchdynamo_orig_callable")  # torch.compile's wrapper
        assert not hasattr(fast.unet.forward, "_torchdynamo_orig_callable")  # the module itself stays eager


def test_inductor_options_reach_torch_compile(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """LIVEGEN_INDUCTOR_OPTIONS: the UNet and the decodes are compiled with the mode's options plus
    these (torch.compile is recorded, not run); without them (and without keep-cl's pass), with the
    mode alone."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    options = {"split_reductions": False}
    Worker(settings.model_copy(update={"torch_compile": "reduce-overhead", "inductor_options": options}))._load(
        SD
    ).fast._compile()
    assert len(calls) >= 2
    assert all(kw["options"]["split_reductions"] is False and kw["options"]["triton.cudagraphs"] for kw in calls)
    calls.clear()
    alone = {"torch_compile": "reduce-overhead", "keep_channels_last": False}
    Worker(settings.model_copy(update=alone))._load(SD).fast._compile()
    assert calls and all(kw == {"dynamic": False, "mode": "reduce-overhead"} for kw in calls)


@pytest.mark.parametrize("on_demand", [False, True])
def test_compiled_shapes_are_the_warm_up_shapes_unless_on_demand(
    settings: Settings, counted_compile: list[int], on_demand: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """With torch.compile on, the shapes rendered at warm-up run compiled; a shape first seen
    later (here a new size) runs uncompiled, so it cannot stall its batch for a ~100 s compile,
    unless compile_on_demand. torch.compile is replaced by a counting wrapper: inductor on a CPU
    would take minutes per shape, and which code runs is what is under test."""

    calls = counted_compile
    s = settings.model_copy(
        update={"models": [SD], "warmup_sizes": ["64x64"], "warmup_buckets": [1], "torch_compile": "default",
                "compile_on_demand": on_demand}
    )  # fmt: skip
    caplog.set_level(logging.INFO, logger="livegen.engine.worker")
    with Worker.start(s) as worker:
        worker.startup.result(timeout=300)
        after_warm_up = calls[0]
        assert after_warm_up > 0
        # A first start with compile can be minutes of warm-up: the log says so first, then what it did.
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"warm-up of {SD}")]
        assert said[0].startswith(f"warm-up of {SD}: 2 shapes, compiled by torch.compile (default)")
        assert said[1].endswith("(CUDA graphs captured: 0, shapes compiled: 2)") and len(said) == 2
        # the warm-up's own text-to-image shape (turbo defaults: 2 steps, guidance 1)
        worker.submit(req(SD, seed=1, num_inference_steps=2, guidance_scale=1.0)).result(timeout=300)
        assert calls[0] > after_warm_up
        before_new_shape = calls[0]
        worker.submit(req(SD, seed=2, width=96, height=96, num_inference_steps=2)).result(timeout=300)
        stats = worker.status()["fast_path"][SD]
    if on_demand:
        assert calls[0] > before_new_shape
        assert stats["compiled_shapes"] == 3 and stats["uncompiled_shapes"] == 0  # t2i + i2i at warm-up, then 96²
    else:
        assert calls[0] == before_new_shape
        assert stats["compiled_shapes"] == 2 and stats["uncompiled_shapes"] == 1


def test_a_shape_whose_compile_fails_still_renders_and_compiling_stops(
    settings: Settings, adapters: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An error from torch.compile (inductor failing to lower an op, say) is the compile's, not
    the request's: the shape runs uncompiled and gives the uncompiled images, the stats and the log
    say so, and no later shape tries to compile again, even with compile_on_demand (each attempt
    costs a minute or more on a GPU). torch.compile is a stand-in that fails every call."""
    from torch._dynamo.exc import TorchDynamoException

    attempts = [0]

    def failing_compile(fn: Any, **_: Any) -> Any:
        def compiled(*args: Any, **kwargs: Any) -> Any:
            attempts[0] += 1
            raise TorchDynamoException("inductor cannot lower aten._scaled_mm here")

        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    s = settings.model_copy(update={"torch_compile": "default", "compile_on_demand": True})
    adapter = Worker(s)._load(SD)
    batch = [req(SD, seed=s, vae="tiny") for s in (1, 2)]
    with caplog.at_level(logging.ERROR, logger="livegen.engine.fastpath"):
        out = pixels(adapter(batch))
    with plain(adapters[SD], "tiny"):
        assert_close(out, pixels(adapters[SD](batch)))
    stats = adapter.fast.stats
    assert (stats.compile_failures, stats.compiled_shapes, stats.uncompiled_shapes) == (1, 0, 1)
    assert "inductor cannot lower" in stats.compile_error and "compiling stops" in caplog.text
    tried = attempts[0]
    assert tried >= 1
    pixels(adapter([req(SD, seed=3, vae="tiny", width=96, height=96)]))  # a new shape: not compiled
    pixels(adapter(batch))  # the failed shape again: not retried
    assert attempts[0] == tried and stats.uncompiled_shapes == 2


def test_kernel_choices_are_set_only_around_the_fast_paths_own_calls(adapters: dict[str, Any]) -> None:
    """cuDNN autotuning and the attention backends' order are process-wide: the fast path sets
    them for its UNet/VAE calls and puts them back, so the plain pipelines (and stock diffusers in
    ``livegen bench``) keep PyTorch's defaults."""
    from torch.nn.attention import SDPBackend

    fast = adapters[SD].fast
    default_order = torch._C._get_sdp_priority_order()
    seen: list[tuple[bool, int]] = []

    def record(*_: Any) -> None:
        seen.append((torch.backends.cudnn.benchmark, torch._C._get_sdp_priority_order()[0]))

    hook = fast.unet.register_forward_pre_hook(record)
    try:
        for on in (True, False):
            fast.options = dataclasses.replace(fast.options, cudnn_benchmark=on, sdpa_cudnn=on)
            pixels(adapters[SD]([req(SD, seed=1)]))
            benchmark, first_backend = seen[-1]
            assert benchmark is on
            assert (first_backend == int(SDPBackend.CUDNN_ATTENTION)) is on
            assert torch.backends.cudnn.benchmark is False
            assert torch._C._get_sdp_priority_order() == default_order
    finally:
        hook.remove()
        fast.options = dataclasses.replace(fast.options, cudnn_benchmark=False, sdpa_cudnn=False)


def device_image(image: Image.Image) -> DeviceImage:
    """What the server hands the engine when its input decoder (nvjpeg on CUDA) decoded a frame."""
    return DeviceImage(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous())


@pytest.mark.parametrize("model", [SD, LCM])
def test_images_decoded_on_the_device_render_as_pillow_images_do(adapters: dict[str, Any], model: str) -> None:
    """Input images the server decoded on the device (``DeviceImage``) go into the fast path's
    batch as they are, alone or beside Pillow images, and through the plain pipelines as Pillow
    images: the same pixels in, the same images out."""
    adapter = adapters[model]
    kw = {"task": Task.IMAGE_TO_IMAGE, "num_inference_steps": 4 if model == LCM else 2, "strength": 0.5}
    pil = [req(model, seed=s, **kw) for s in (1, 2)]
    on_device = [dataclasses.replace(r, image=device_image(r.image)) for r in pil]
    mixed = [on_device[0], pil[1]]
    reference = pixels(adapter(pil))
    assert np.array_equal(pixels(adapter(on_device)), reference)
    assert np.array_equal(pixels(adapter(mixed)), reference)
    with plain(adapter, "tiny"):
        assert np.array_equal(pixels(adapter(on_device)), pixels(adapter(pil)))


def test_input_jpegs_are_decoded_on_the_device_only_when_asked_on_cuda(settings: Settings) -> None:
    """Pillow decodes inputs unless ``gpu_jpeg_decode`` (off by default: untrusted bytes), and
    always on a CPU engine, without the fast path, or where torchvision cannot be imported (the
    nvjpeg decoder is torchvision's)."""
    from livegen.engine import worker as worker_module

    asked = settings.model_copy(update={"gpu_jpeg_decode": True})
    for s in (settings, asked):
        cpu = Worker(s)
        assert cpu.input_decoder is None
        assert cpu.status()["input_decode"] == {"decoder": "pillow"}
    cuda = torch.device("cuda")
    assert Settings().gpu_jpeg_decode is False
    assert worker_module.input_decoder(settings, cuda, True) is None  # not asked for
    assert worker_module.input_decoder(asked, cuda, False) is None  # no fast path
    try:
        import torchvision.io  # noqa: F401
    except Exception:  # noqa: BLE001 - missing here, or a CUDA build beside a CPU torch
        assert worker_module.input_decoder(asked, cuda, True) is None


def test_device_time_estimate_takes_up_shorter_times_faster() -> None:
    """The worker holds batches back on this estimate: too long idles the device, so a shorter
    measurement moves it 2.5 times as far as a longer one does."""
    from types import SimpleNamespace

    from livegen.engine.fastpath import DEVICE_MS_SMOOTHING, FastPath

    fast = SimpleNamespace(device_ms={})
    key = ("t2i", 512, 512)
    FastPath._timed(fast, key, 10.0)  # type: ignore[arg-type]
    assert fast.device_ms[key] == 10.0
    FastPath._timed(fast, key, 20.0)  # type: ignore[arg-type]
    assert fast.device_ms[key] == pytest.approx(10.0 + DEVICE_MS_SMOOTHING * 10.0)
    before = fast.device_ms[key]
    FastPath._timed(fast, key, 8.0)  # type: ignore[arg-type]
    assert fast.device_ms[key] == pytest.approx(before - 2.5 * DEVICE_MS_SMOOTHING * (before - 8.0))


@pytest.mark.parametrize(("version", "used"), [("0.21.0+cu124", False), ("0.22.0", True), ("0.26.0+cu130", True)])
def test_gpu_jpeg_encoder_needs_a_torchvision_that_waits_for_its_input(
    monkeypatch: pytest.MonkeyPatch, version: str, used: bool
) -> None:
    """Before torchvision 0.22, its nvjpeg encoder read the input on its own stream without
    waiting for the stream that wrote it (pytorch/vision#8929): PIL encodes then."""
    import sys
    import types

    from livegen.engine import fastpath

    def encode_jpeg(*args: Any, **kwargs: Any) -> list[torch.Tensor]:
        raise AssertionError("not called here")

    fake = types.ModuleType("torchvision")
    fake.__version__ = version  # type: ignore[attr-defined]
    io_module = types.ModuleType("torchvision.io")
    io_module.encode_jpeg = encode_jpeg  # type: ignore[attr-defined]
    fake.io = io_module  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.io", io_module)
    assert (fastpath._load_gpu_jpeg() is encode_jpeg) is used
    assert fastpath._version(version) >= (0, 22) if used else fastpath._version(version) < (0, 22)


def test_a_dynamic_batch_compile_serves_every_bucket_above_one(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compile_dynamic_batch: warm-up at buckets 1 and 2 compiles the batch dimension as dynamic,
    and batches of 3 and 5 (buckets 4 and 8) then run that compiled code, with no recompile and
    the same images. Text-to-image and image-to-image share each compile: before session 8 the
    image-to-image latents' channels_last strides failed dynamo's guards, and warm-up compiled
    the UNet and the decode twice per bucket (8 graphs; on an H100 ~50 s each). Real dynamo
    tracing, with a backend that counts the graphs it is handed and runs them as traced (inductor
    on a CPU would take minutes per graph)."""
    import torch._dynamo

    graphs: list[tuple[int, ...]] = []
    real_compile = torch.compile

    def counting_backend(gm: Any, example_inputs: list[Any]) -> Any:
        graphs.append(tuple(x.shape[0] for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() == 4))
        return gm.forward

    def traced(fn: Any, **kw: Any) -> Any:
        return real_compile(fn, backend=counting_backend, dynamic=kw.get("dynamic"))

    monkeypatch.setattr(torch, "compile", traced)
    s = settings.model_copy(
        update={"models": [SD], "warmup_sizes": ["64x64"], "warmup_buckets": [1, 2], "torch_compile": "default",
                "compile_dynamic_batch": True, "max_batch_size": 8, "batch_fill": 0.0}  # 5 rows: bucket 8
    )  # fmt: skip
    torch._dynamo.reset()
    try:
        with Worker.start(s) as worker:
            worker.startup.result(timeout=600)
            after_warm_up = len(graphs)
            # UNet and decode, each at batch 1 and batch 2 (dynamic), for both tasks of the warm-up.
            assert after_warm_up == 4, graphs
            batches = {n: [req(SD, seed=10 * n + i, num_inference_steps=2, guidance_scale=1.0) for i in range(n)]
                       for n in (3, 5)}  # fmt: skip
            compiled_images = {n: run_together(worker, b) for n, b in batches.items()}
            stats = worker.status()["fast_path"][SD]
        assert len(graphs) == after_warm_up, graphs[after_warm_up:]  # buckets 4 and 8: nothing compiled
        assert stats["compile_reused_shapes"] >= 2 and stats["uncompiled_shapes"] == 0
    finally:
        torch._dynamo.reset()
    plain = s.model_copy(update={"torch_compile": "off", "warmup_sizes": []})
    with Worker.start(plain) as worker:
        worker.startup.result(timeout=600)
        for n, b in batches.items():
            assert run_together(worker, b) == compiled_images[n]


def run_together(worker: Worker, batch: list[GenerationRequest]) -> list[bytes]:
    """Submitted at once, so the worker runs them as one batch; each result's decoded pixels."""
    futures = worker.submit_all(batch)
    results = [f.result(timeout=600) for f in futures]
    assert {r.batch_size for r in results} == {len(batch)}
    return [np.asarray(Image.open(io.BytesIO(r.images[0].data))).tobytes() for r in results]


def test_compiled_code_is_cached_in_the_data_dir(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Inductor's cache goes to DATA_DIR/compile-cache, so a restart skips the ~100 s compiles.
    Importing torch's compile stack already sets TORCHINDUCTOR_CACHE_DIR to /tmp/torchinductor_<user>,
    which the old ``setdefault`` kept (the cache never reached the data dir). A location the
    user set is kept."""
    import os

    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    from livegen.engine.worker import use_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # as importing torch leaves it
    Worker(settings.model_copy(update={"torch_compile": "default"}))._load(SD)
    assert cache_dir() == str(settings.compile_cache_dir / "inductor")
    assert os.path.isdir(settings.compile_cache_dir / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    use_compile_cache(settings.compile_cache_dir / "inductor")
    assert cache_dir() == str(tmp_path / "mine")


# -- GroupNorm in channels_last (fastpath.group_norm_nhwc) ------------------------------------------


def _group_norm_case(dtype: torch.dtype, offset: float) -> tuple[torch.nn.GroupNorm, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(32, 320, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(2, 320, 16, 16) + offset).to(dtype).contiguous(memory_format=torch.channels_last)
    exact = torch.nn.functional.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), 1e-5)
    return norm, x, exact


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 3.0, 10.0])
def test_group_norm_nhwc_is_as_close_to_exact_as_pytorchs(dtype: torch.dtype, offset: float) -> None:
    """Against float32 group norm: within PyTorch's own half-precision error where a group's mean
    is within a few spreads of zero (the normal case), within 3x of it at 10 spreads; the output
    stays channels_last (no copy back for the next convolution)."""
    from livegen.engine.fastpath import group_norm_nhwc

    norm, x, exact = _group_norm_case(dtype, offset)
    with torch.inference_mode():
        ours = group_norm_nhwc(norm, x)
        theirs = norm(x)
    assert ours.dtype == dtype and ours.shape == x.shape
    assert ours.is_contiguous(memory_format=torch.channels_last) and not ours.is_contiguous()
    ours_err = (ours.float() - exact).abs().max().item()
    theirs_err = (theirs.float() - exact).abs().max().item()
    assert ours_err <= (1.01 if offset < 5 else 3.0) * theirs_err + 1e-6, (ours_err, theirs_err)


def test_group_norm_nhwc_leaves_other_inputs_to_pytorch() -> None:
    """float32, NCHW inputs and autograd go to PyTorch's group norm, bit for bit."""
    from livegen.engine.fastpath import group_norm_nhwc

    norm, x, _ = _group_norm_case(torch.float32, 1.0)
    with torch.inference_mode():
        assert torch.equal(group_norm_nhwc(norm, x), norm(x))  # float32
    half = copy.deepcopy(norm).to(torch.float16)
    with torch.inference_mode():
        nchw = x.half().contiguous()
        assert torch.equal(group_norm_nhwc(half, nchw), half(nchw))
    out = group_norm_nhwc(half, x.half())  # grad enabled, weights require grad: PyTorch's
    assert out.requires_grad and torch.equal(out.detach(), half(x.half()).detach())


def tiny_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()  # fmt: skip


def test_the_fast_path_runs_its_modules_in_eval_mode() -> None:
    """A UNet and VAEs handed over in training mode (as from_config builds them) are put in eval
    mode: in training mode diffusers copies each resnet shortcut's input (.contiguous()), and
    dropout is live."""
    import types

    from diffusers import AutoencoderKL, AutoencoderTiny, EulerDiscreteScheduler

    from livegen.engine.fastpath import FastOptions, FastPath

    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4)  # fmt: skip
    pipe = types.SimpleNamespace(unet=tiny_unet().train(), vae=vae.train(), scheduler=EulerDiscreteScheduler())
    assert pipe.unet.training and pipe.vae.training
    options = FastOptions(tiny_vae_fold_upsample=True, tiny_vae_conv_relu=True)  # its rewrites' new modules too
    fast = FastPath(pipe, sdxl=False, tiny_vae=AutoencoderTiny().train(), device=torch.device("cpu"),
                    dtype=torch.float32, options=options)  # fmt: skip
    for module in (fast.unet, fast.full_vae, fast.tiny_vae):
        assert not any(m.training for m in module.modules())


def test_keep_channels_last_in_group_norms_changes_every_group_norm_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a (tiny) UNet in half precision and channels_last: every GroupNorm computes in NHWC (each
    one's input arrives channels_last), the UNet's output stays within half-precision noise of the
    unchanged UNet's, and a second call changes nothing more."""
    from livegen.engine import fastpath
    from livegen.engine.fastpath import keep_channels_last_in_group_norms

    layouts: list[bool] = []
    real = fastpath.group_norm_nhwc

    def spy(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return real(norm, x)

    monkeypatch.setattr(fastpath, "group_norm_nhwc", spy)
    unet = tiny_unet()
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in unet.modules())
    before = copy.deepcopy(unet).to(torch.bfloat16, memory_format=torch.channels_last)
    after = copy.deepcopy(before)
    assert keep_channels_last_in_group_norms(after) == norms > 0
    assert keep_channels_last_in_group_norms(after) == 0
    torch.manual_seed(1)
    latents = torch.randn(1, 4, 16, 16).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    embeds = torch.randn(1, 77, before.config.cross_attention_dim).to(torch.bfloat16)
    with torch.inference_mode():
        a = before(latents, 999, encoder_hidden_states=embeds).sample.float()
        b = after(latents, 999, encoder_hidden_states=embeds).sample.float()
    assert (a - b).abs().max().item() <= 0.05 * a.abs().max().item()
    assert len(layouts) == norms and all(layouts)


# -- GEGLU's halves projected apart (fastpath.split_geglu) ---------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_geglu_computes_what_diffusers_geglu_does_on_contiguous_halves(dtype: torch.dtype) -> None:
    """On a (tiny) UNet: every GEGLU is changed once; its gelu then sees a contiguous gate (in
    diffusers' own forward it is a strided half of one projection: PyTorch's non-vectorized CUDA
    kernels); the UNet's output is the same within the dtype's rounding."""
    from diffusers.models.activations import GEGLU

    from livegen.engine.fastpath import split_geglu

    unet = tiny_unet().to(dtype)
    gelus = [m for m in unet.modules() if isinstance(m, GEGLU)]
    contiguous: list[bool] = []
    for g in gelus:
        real = g.gelu
        g.gelu = lambda gate, real=real: (contiguous.append(gate.is_contiguous()), real(gate))[1]  # type: ignore[method-assign]
    torch.manual_seed(1)
    latents = torch.randn(2, 4, 16, 16).to(dtype)
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim).to(dtype)
    with torch.inference_mode():
        before = unet(latents, 999, encoder_hidden_states=embeds).sample.float()
        assert len(contiguous) == len(gelus) > 0 and not any(contiguous)  # diffusers: strided halves
        contiguous.clear()
        assert split_geglu(unet) == len(gelus)
        assert split_geglu(unet) == 0
        after = unet(latents, 999, encoder_hidden_states=embeds).sample.float()
    assert len(contiguous) == len(gelus) and all(contiguous)
    tolerance = 1e-5 if dtype == torch.float32 else 0.02
    assert (before - after).abs().max().item() <= tolerance * before.abs().max().item()


def test_split_geglu_leaves_wrapped_projections_alone() -> None:
    """A projection that is not a plain Linear (an unfused LoRA layer adds its own term in forward)
    keeps diffusers' forward: slicing its weight would drop that term."""
    from diffusers.models.activations import GEGLU

    from livegen.engine.fastpath import split_geglu

    class Wrapped(torch.nn.Linear):
        pass

    geglu = GEGLU(8, 16)
    geglu.proj = Wrapped(8, 32)
    assert split_geglu(geglu) == 0 and "forward" not in vars(geglu)


def test_split_geglu_setting_gives_the_same_images(settings: Settings) -> None:
    """``LIVEGEN_SPLIT_GEGLU`` (on by default): the fast path's images with it match those without
    (CPU, fp32)."""
    from diffusers.models.activations import GEGLU

    plain = Worker(settings.model_copy(update={"split_geglu": False}))._load(SD)
    split = Worker(settings)._load(SD)
    changed = [m for m in split.fast.unet.modules() if isinstance(m, GEGLU) and "forward" in vars(m)]
    assert changed and not any("forward" in vars(m) for m in plain.fast.unet.modules() if isinstance(m, GEGLU))
    batch = [req(SD, seed=s, vae="tiny") for s in (5, 6)]
    assert_close(pixels(split(batch)), pixels(plain(batch)))
