"""A minimal TensorBoard event-file writer, with the standard library only.

TensorBoard reads TFRecord files of ``Event`` protocol buffers. The few messages needed
here are encoded by hand rather than pulling in tensorboard or protobuf: the core must
stay numpy + pluggy + stdlib. Format: each record is
``uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)``.

Three kinds of summary are written, each as its plugin expects it:

* scalars: ``Summary.Value.simple_value`` (TensorBoard migrates it to the scalars plugin);
* text (the text plugin): a scalar ``DT_STRING`` tensor with plugin ``"text"``, markdown;
* the custom-scalars layout (tag ``custom_scalars__config__``, plugin ``"custom_scalars"``):
  a serialised ``Layout`` whose charts overlay every tag matching a regular expression,
  so curves that belong together are drawn in one chart.

Field numbers are those of tensorboard/compat/proto/{event,summary,tensor}.proto and
plugins/custom_scalar/layout.proto.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["LAYOUT_TAG", "EventFileWriter", "crc32c", "layout"]

#: The tag TensorBoard's custom-scalars plugin reads its layout from.
LAYOUT_TAG = "custom_scalars__config__"
_DT_STRING = 7  # tensorflow DataType
_DATA_CLASS_TENSOR = 2  # SummaryMetadata.DataClass


def _make_table() -> list[int]:
    poly = 0x82F63B78  # CRC-32C (Castagnoli), reflected
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None, summary: bytes | None = None) -> bytes:
    out = b"\x09" + struct.pack("<d", wall_time)  # field 1, double
    out += b"\x10" + _varint(step)  # field 2, int64
    if file_version is not None:
        out += _len_field(0x1A, file_version.encode())  # field 3, string
    if summary is not None:
        out += _len_field(0x2A, summary)  # field 5, Summary
    return out


def _summary(scalars: Iterable[tuple[str, float]]) -> bytes:
    out = b""
    for tag, value in scalars:
        val = _len_field(0x0A, tag.encode()) + b"\x15" + struct.pack("<f", value)  # Value.tag, simple_value
        out += _len_field(0x0A, val)  # Summary.value (repeated)
    return out


def _string_tensor_value(tag: str, plugin: str, text: bytes) -> bytes:
    """A ``Summary.Value`` holding a scalar string tensor for ``plugin``."""
    plugin_data = _len_field(0x0A, plugin.encode())  # PluginData.plugin_name (content: empty)
    metadata = _len_field(0x0A, plugin_data) + b"\x20" + _varint(_DATA_CLASS_TENSOR)  # plugin_data, data_class
    tensor = b"\x08" + _varint(_DT_STRING) + _len_field(0x12, b"") + _len_field(0x42, text)  # dtype, shape [], string_val
    return _len_field(0x0A, tag.encode()) + _len_field(0x4A, metadata) + _len_field(0x42, tensor)  # tag, metadata, tensor


def layout(categories: Sequence[tuple[str, Sequence[tuple[str, Sequence[str]]]]]) -> bytes:
    """A serialised custom-scalars ``Layout``: ``[(category title, [(chart title,
    [tag regex, ...]), ...]), ...]``; each chart overlays every tag its regexes match."""
    out = b""
    for title, charts in categories:
        cat = _len_field(0x0A, title.encode())
        for chart_title, regexes in charts:
            multiline = b"".join(_len_field(0x0A, r.encode()) for r in regexes)  # MultilineChartContent.tag
            cat += _len_field(0x12, _len_field(0x0A, chart_title.encode()) + _len_field(0x12, multiline))  # Chart
        out += _len_field(0x12, cat)  # Layout.category
    return out


class EventFileWriter:
    """Appends summaries to one ``events.out.tfevents.*`` file in ``logdir``."""

    def __init__(self, logdir: str | os.PathLike[str]) -> None:
        d = Path(logdir)
        d.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.gradwatch"
        self.path = d / name
        self._f = open(self.path, "ab")
        self._write(_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._f.write(header + struct.pack("<I", _masked(crc32c(header))) + data + struct.pack("<I", _masked(crc32c(data))))

    def add_scalars(self, step: int, scalars: Iterable[tuple[str, float]]) -> None:
        """One event holding all ``(tag, value)`` pairs at ``step``; flushed at once."""
        items = list(scalars)
        if not items:
            return
        self._write(_event(time.time(), step, summary=_summary(items)))
        self._f.flush()

    def add_text(self, step: int, tag: str, text: str) -> None:
        """One text summary (markdown, shown by TensorBoard's text dashboard) at ``step``."""
        value = _string_tensor_value(tag, "text", text.encode("utf-8"))
        self._write(_event(time.time(), step, summary=_len_field(0x0A, value)))
        self._f.flush()

    def add_layout(self, serialised_layout: bytes) -> None:
        """The custom-scalars layout (see :func:`layout`), at step 0."""
        value = _string_tensor_value(LAYOUT_TAG, "custom_scalars", serialised_layout)
        self._write(_event(time.time(), 0, summary=_len_field(0x0A, value)))
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
