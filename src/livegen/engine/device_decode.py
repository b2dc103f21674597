"""Input JPEGs decoded on the engine's GPU (torchvision's nvjpeg) instead of by Pillow.

A realtime image-to-image frame is a JPEG of the output's size, up to 60 a second per session.
Pillow decodes a 512² one in ~1.5 ms of a CPU core (measured on a 2-core VM), and the fast path
then copies its 768 KiB of pixels to the GPU. nvjpeg decodes the 40 KiB file on the GPU instead
(on A100/H100 on the hardware JPEG engines, beside the SMs), into a tensor the fast path stacks
into its batch without a host round trip.

The server still opens every input with Pillow first, so format, size and pixel limits are
checked from the header as for any image (``imaging.open_image``). Only JPEGs that decode to the
same pixels either way go to the GPU (``imaging.device_decodable``: no EXIF rotation, YCbCr or
grayscale, complete), and only when no resize is needed. Anything else, and any image the GPU
decoder refuses, is decoded by Pillow, whose errors are the 422s a client sees.

Opt-in (``LIVEGEN_GPU_JPEG_DECODE``): the entropy-coded data of an untrusted file still reaches
nvjpeg, and a fault there that is a CUDA error rather than a status code would poison the CUDA
context every session shares; Pillow's decode is hardened and costs ~1 ms of a CPU core, off the
device thread. BENCHMARKS.md has what each costs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from livegen.engine import DeviceImage

logger = logging.getLogger(__name__)

__all__ = ["JpegDecoder"]


class JpegDecoder:
    """Decodes JPEG bytes into ``DeviceImage``s; called from the server's worker threads.

    ``decode`` maps the bytes to a uint8 (3, H, W) RGB tensor on ``device``, ready to be read
    from any stream (``nvjpeg`` synchronizes its own stream before returning). Tests pass a
    stand-in, as no CPU build of torchvision is at hand there.
    """

    def __init__(self, device: torch.device, decode: Callable[[bytes], torch.Tensor], name: str) -> None:
        self.device = device
        self.name = name
        self._decode = decode
        self._lock = threading.Lock()
        self.images = 0
        self.fallbacks = 0
        self._warned = False

    @classmethod
    def nvjpeg(cls, device: torch.device) -> JpegDecoder | None:
        """torchvision's GPU decoder on ``device``, or None when torchvision is not importable."""
        try:
            from torchvision.io import ImageReadMode, decode_jpeg
        except Exception:  # noqa: BLE001 - any import failure (missing, or built for another torch): Pillow
            return None
        streams: list[torch.cuda.Stream] = []
        made = threading.Lock()

        def decode(data: bytes) -> torch.Tensor:
            with made:
                if not streams:  # created on first use, on a server thread, not at import
                    streams.append(torch.cuda.Stream(device))
            stream = streams[0]
            # A copy: torch.frombuffer wants a writable buffer, and 40 KB costs nothing.
            encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            # On a side stream: torchvision makes the current stream wait for its decoder, so on
            # the default stream the wait (and the synchronize below) would queue behind the
            # UNet batch running there. The fast path record_stream()s what it reads.
            with torch.cuda.stream(stream):
                pixels = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
            stream.synchronize()
            return pixels  # type: ignore[no-any-return]

        return cls(device, decode, "nvjpeg")

    def warm_up(self) -> None:
        """Decode a small JPEG once, not counted: nvjpeg sets up its handle, buffers and stream on
        first use (tens of ms), which the first realtime frame should not wait for."""
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (96, 128, 160)).save(buf, "JPEG")
        try:
            self._decode(buf.getvalue())
        except Exception as exc:  # noqa: BLE001 - said here; each frame then falls back to Pillow
            logger.warning("%s failed its warm-up decode (%s); input JPEGs may be decoded by Pillow", self.name, exc)

    def __call__(self, data: bytes) -> DeviceImage | None:
        """The decoded image, or None when this decoder failed on it (the caller then uses Pillow)."""
        try:
            pixels = self._decode(data)
            if pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[0] != 3:
                raise ValueError(f"expected uint8 (3, H, W), got {pixels.dtype} {tuple(pixels.shape)}")
        except Exception as exc:  # noqa: BLE001 - Pillow decides what the client is told
            with self._lock:
                self.fallbacks += 1
                first, self._warned = not self._warned, True
            # The first failure at warning level (a decoder that never works should be seen),
            # later ones at debug. Never the image itself.
            logger.log(
                logging.WARNING if first else logging.DEBUG,
                "%s could not decode an input JPEG (%s); Pillow decodes it",
                self.name,
                exc,
            )
            return None
        with self._lock:
            self.images += 1
        return DeviceImage(pixels)

    def status(self) -> dict[str, object]:
        return {"decoder": self.name, "device": str(self.device), "images": self.images, "fallbacks": self.fallbacks}
