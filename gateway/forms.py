"""Multipart forms (uploads: audio, video) read with bounds, and their text fields.

:func:`read_form` refuses a body announced past ``limit`` before reading it
(413), stops one that grows past it while streaming, and caps the number of
fields and files; a field that should be text and is a file, or a flag that is
not ``true``/``false``, is a 400 naming the field.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from starlette.datastructures import FormData
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import Request

from gateway.openai_wire import InvalidParam
from protocol.errors import BadRequest, TooLarge

__all__ = ["form_flag", "form_text", "read_form"]

MAX_FIELDS = 16  # form fields one request may carry besides the file


async def read_form(request: Request, limit: int) -> FormData:
    """The form (multipart, or URL-encoded fields), at most ``limit`` bytes, one file and
    :data:`MAX_FIELDS` fields."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise BadRequest(
            f"this route takes a multipart form (Content-Type: multipart/form-data), got {media or 'none'}"
        )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise TooLarge(f"the upload ({length} bytes) exceeds the limit of {limit} bytes")

    async def capped() -> AsyncGenerator[bytes, None]:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"the upload exceeds the limit of {limit} bytes")
            yield chunk

    if media == "application/x-www-form-urlencoded":  # fields only (a url, say)
        form = await FormParser(request.headers, capped()).parse()
        if len(form) > MAX_FIELDS:
            raise BadRequest(f"the form has more than {MAX_FIELDS} fields")
        return form
    parser = MultiPartParser(request.headers, capped(), max_files=1, max_fields=MAX_FIELDS)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise BadRequest(f"the form could not be read: {exc.message}") from None


def form_text(form: FormData, name: str) -> str:
    """Text field ``name`` stripped ("" when absent)."""
    value = form.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidParam(name, f"{name} must be a text field")
    return value.strip()


def form_flag(form: FormData, name: str) -> bool:
    """Boolean field ``name``: ``true``/``1`` or ``false``/``0`` (absent: false)."""
    raw = form_text(form, name).lower()
    if raw in ("", "false", "0"):
        return False
    if raw in ("true", "1"):
        return True
    raise InvalidParam(name, f"{name} must be true or false")
