"""Reading the multipart upload of ``POST /v1/captions`` into memory, bounded in size and bytes.

The body is parsed here with python-multipart (never spooled to disk) and only the first
``image`` part is kept. :class:`UploadBudget` caps the bytes that all uploads in progress hold
together, which bounds memory now that a request is read *before* it takes a place in the
batcher's queue (so that slow clients cannot occupy the queue).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

UPLOAD_FIELD = "image"
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and small extra fields
MAX_PARTS = 16


class UploadError(Exception):
    """A bad upload; carries the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UploadBudget:
    """Counts uploads in progress and the memory they hold; refuses bytes beyond capacity.

    Lives on the event loop (no locking). A request reserves its declared Content-Length up
    front, or its chunks as they arrive when the body is chunked; the decoder then reserves the
    decoded picture's bytes (:mod:`captioner.web.decoding`), so that a 60 KB PNG claiming 64 MP
    counts as the 256 MB it takes to decode, not as 60 KB.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.in_progress = 0
        self.bytes_in_use = 0
        self.rejected = 0

    def take(self, n: int) -> bool:
        """Hold ``n`` bytes if there is room (True), else count a rejection (False)."""
        if self.bytes_in_use + n > self.capacity_bytes:
            self.rejected += 1
            return False
        self.bytes_in_use += n
        return True

    def give_back(self, n: int) -> None:
        self.bytes_in_use -= n

    def busy_message(self) -> str:
        return (
            f"server busy: uploads in progress hold {_mb(self.bytes_in_use)} "
            f"of {_mb(self.capacity_bytes)}, try again shortly"
        )

    @contextlib.contextmanager
    def track(self) -> Iterator[UploadHandle]:
        """One upload: counted while inside, its reserved bytes given back on exit."""
        handle = UploadHandle(self)
        self.in_progress += 1
        try:
            yield handle
        finally:
            self.in_progress -= 1
            self.bytes_in_use -= handle.reserved
            handle.reserved = 0


class UploadHandle:
    """One upload's share of an :class:`UploadBudget`."""

    def __init__(self, budget: UploadBudget) -> None:
        self.budget = budget
        self.reserved = 0

    def reserve(self, n: int) -> None:
        """Hold ``n`` more bytes, or raise UploadError(503) when the budget has no room."""
        if not self.budget.take(n):
            raise UploadError(503, self.budget.busy_message())
        self.reserved += n


async def read_upload(request: Request, limit: int, handle: UploadHandle) -> tuple[bytes, str]:
    """Stream the multipart body into memory (bounded) and return the ``image`` part."""
    body_limit = limit + MULTIPART_OVERHEAD
    too_large = f"upload too large: the limit is {_mb(limit)}"
    length = request.headers.get("content-length")
    declared: int | None = None
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise UploadError(400, "invalid Content-Length header") from None
        if declared > body_limit:
            raise UploadError(413, too_large)
        if declared == 0:
            raise UploadError(422, _missing_field("the request body is empty"))
    content_type = request.headers.get("content-type", "")
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data":
        if not content_type and length is None:
            raise UploadError(422, _missing_field("the request body is empty"))
        shown = ctype.decode("latin-1") or "none"
        raise UploadError(
            415,
            f"expected multipart/form-data (got Content-Type: {shown}); "
            f"send the picture as a file field named '{UPLOAD_FIELD}'",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "multipart/form-data without a boundary")
    if declared is not None:
        handle.reserve(declared)

    collector = _PartCollector(limit)
    try:
        parser = MultipartParser(boundary, collector.callbacks(), max_header_count=16)
    except ValueError as exc:
        raise UploadError(400, f"malformed multipart body: {exc}") from None
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise UploadError(413, too_large)
            if declared is None:
                handle.reserve(len(chunk))
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except ClientDisconnect:
        raise UploadError(400, "the client closed the connection during the upload") from None
    except _PartTooLarge:
        raise UploadError(413, too_large) from None
    except _TooManyParts:
        raise UploadError(400, f"too many form fields (at most {MAX_PARTS})") from None
    except ValueError as exc:  # python-multipart parse errors derive from ValueError
        raise UploadError(400, f"malformed multipart body: {exc}") from None
    if received == 0:
        raise UploadError(422, _missing_field("the request body is empty"))
    if not collector.ended:
        raise UploadError(400, "malformed multipart body: it ends before the closing boundary")
    if collector.image is None:
        raise UploadError(422, _missing_field("the form has no file field named 'image'"))
    if not collector.image:
        raise UploadError(422, f"the uploaded file '{collector.filename}' is empty")
    return bytes(collector.image), collector.filename


def _missing_field(why: str) -> str:
    return f"{why}: send multipart/form-data with the picture in a file field named 'image'"


def _mb(n: int) -> str:
    return f"{round(n / (1024 * 1024), 2):g} MB"


class _PartTooLarge(Exception):
    pass


class _TooManyParts(Exception):
    pass


class _PartCollector:
    """python-multipart callbacks that keep only the first ``image`` part, in memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.image: bytearray | None = None
        self.filename = "upload"
        self.ended = False
        self._parts = 0
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._target: bytearray | None = None

    def callbacks(self) -> dict[str, Callable]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise _TooManyParts
        self._headers = {}
        self._target = None

    def _header_end(self) -> None:
        self._headers[bytes(self._field).strip().lower()] = bytes(self._value).strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if options.get(b"name") == UPLOAD_FIELD.encode() and self.image is None:
            self.image = bytearray()
            self._target = self.image
            filename = options.get(b"filename")
            if filename:
                self.filename = Path(filename.decode("utf-8", "replace")).name[:200] or "upload"

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._target is None:
            return
        if len(self._target) + (end - start) > self.limit:
            raise _PartTooLarge
        self._target.extend(data[start:end])

    def _end(self) -> None:
        self.ended = True
