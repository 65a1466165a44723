"""OpenAI chat-completion request bodies and images for the serving tests."""

from __future__ import annotations

import base64
import io
import struct
import zlib

from PIL import Image


def data_url(size=(40, 30), fmt="PNG", colour=(200, 30, 30)) -> str:
    """A ``data:`` URL of a plain image of ``size`` (width, height)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def chat(*content, role="user", **extra):
    return {"model": "m", "messages": [{"role": role, "content": list(content)}], **extra}


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text="What is this?"):
    return {"type": "text", "text": text}


def bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG, compressed row by row (never held decoded in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def video_part(url):
    return {"type": "video_url", "video_url": {"url": url}}


def video_data_url(data: bytes, mime: str = "video/mp4") -> str:
    """A ``data:`` URL of encoded video bytes (``tests/helpers/media.py``)."""
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
