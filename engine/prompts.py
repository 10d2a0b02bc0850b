"""A generation's prompt, prepared in the worker before the request is queued.

The chat is rendered with the model's template (and the tools it offers),
tokenized, and checked against the context window; a chat that does not fit
drops its oldest droppable messages when the request allows it
(:mod:`engine.truncation` decides the cut). Tool calling adds its grammar to
the sampling here, so a bad combination fails before the request waits for a
slot.
"""

from __future__ import annotations

import time

import msgspec

from engine import ipc
from engine.backends import TextGenerator
from engine.requests import ChatMessage, ToolFunction
from engine.tools import tool_grammar
from engine.truncation import droppable, estimated_cut, settle_cut
from protocol.errors import BadRequest, TooLarge

__all__ = ["MAX_IMAGES", "prompt_tokens", "tokenize_prompt", "with_tool_grammar"]

MAX_IMAGES = 8  # images one prompt shows a vision language model


def with_tool_grammar(msg: ipc.Generate) -> ipc.Generate:
    """``msg`` with the grammar its tools and tool choice call for (engine.tools)."""
    if not msg.tools or msg.tool_choice == "none":
        if msg.tool_name is not None or msg.tool_choice == "required":
            raise BadRequest("tool_choice needs tools")
        return msg
    if msg.messages is None:
        raise BadRequest("tools need chat messages, not a raw prompt")
    if msg.sampling.constraint() is not None:
        raise BadRequest("tools cannot be combined with an output format (json, schema, grammar)")
    grammar = tool_grammar(msg.tools, msg.tool_choice, msg.tool_name, msg.parallel_tool_calls)
    return msgspec.structs.replace(
        msg, sampling=msgspec.structs.replace(msg.sampling, lark=grammar)
    )


def prompt_tokens(backend: TextGenerator, msg: ipc.Generate) -> list[int]:
    """The prompt's tokens: the chat rendered (and cut to fit when asked), or the raw prompt.

    Raises BadRequest or TooLarge for a prompt that cannot run.
    """
    deadline = time.perf_counter() + msg.prepare_timeout
    if msg.messages is not None and any(m.images for m in msg.messages):
        tokens = _with_images(backend, msg, list(msg.messages))
    elif msg.messages is not None:
        messages = list(msg.messages)
        if not messages:
            raise BadRequest("a chat needs at least one message")
        tokens = tokenize_prompt(backend, backend.render_chat(messages, _tools(msg)))
        if msg.truncate and not _fits(backend, msg, len(tokens)):
            tokens = _truncated(backend, msg, messages, len(tokens), deadline)
    elif msg.prompt is not None:
        tokens = tokenize_prompt(backend, msg.prompt)
    else:
        raise BadRequest("a request needs a prompt or messages")
    if not tokens:
        raise BadRequest("the prompt is empty")
    if msg.max_prompt_tokens and len(tokens) > msg.max_prompt_tokens:
        raise TooLarge(f"the prompt has {len(tokens)} tokens; the limit is {msg.max_prompt_tokens}")
    if len(tokens) >= backend.n_ctx:
        raise BadRequest(
            f"the prompt has {len(tokens)} tokens; the context window holds {backend.n_ctx}"
        )
    return tokens


def _with_images(
    backend: TextGenerator, msg: ipc.Generate, messages: list[ChatMessage]
) -> list[int]:
    """A chat showing images: each turn's images are marked where its text begins and
    read by the model's own image encoder. Not cut to fit: which image a dropped turn
    took away would change the question."""
    images = [img for m in messages for img in m.images or ()]
    if not backend.reads_images:
        raise BadRequest(
            "this model cannot read images: images in a chat need a vision language "
            "model (a GGUF model with its projector); an image model classifies them "
            "(/v1/classify) or embeds them (embeddings with images)"
        )
    if len(images) > MAX_IMAGES:
        raise TooLarge(f"{len(images)} images; one prompt shows at most {MAX_IMAGES}")
    marked = [
        msgspec.structs.replace(
            m, content=backend.image_marker * len(m.images) + "\n" + m.content, images=None
        )
        if m.images
        else m
        for m in messages
    ]
    text = backend.render_chat(marked, _tools(msg))
    return backend.tokenize_with_images(text, images)


def _truncated(
    backend: TextGenerator,
    msg: ipc.Generate,
    messages: list[ChatMessage],
    full: int,
    deadline: float,
) -> list[int]:
    """The prompt without the oldest non-system messages it must drop to fit.

    Each droppable message is tokenized once; the cut is estimated from
    those counts and settled with a few renders (engine.truncation).
    """
    drop = droppable([m.role for m in messages])
    costs = [len(backend.tokenize(messages[i].content, add_bos=False)) for i in drop]
    limit = _limit(backend, msg)
    rendered: dict[int, list[int]] = {}

    def without(k: int) -> list[ChatMessage]:
        gone = set(drop[:k])
        return [m for i, m in enumerate(messages) if i not in gone]

    def fits(k: int) -> bool:
        rendered[k] = tokenize_prompt(backend, backend.render_chat(without(k), _tools(msg)))
        return len(rendered[k]) <= limit

    cut = settle_cut(estimated_cut(full, costs, limit), len(drop), fits, deadline=deadline)
    return (
        rendered[cut]
        if cut in rendered
        else tokenize_prompt(backend, backend.render_chat(without(cut), _tools(msg)))
    )


def _tools(msg: ipc.Generate) -> list[ToolFunction] | None:
    """The tools the prompt describes: none with ``tool_choice: none``."""
    return msg.tools if msg.tool_choice != "none" else None


def tokenize_prompt(backend: TextGenerator, text: str) -> list[int]:
    """``text``'s tokens, with a BOS unless the text (a rendered template) begins with one."""
    add_bos = not (backend.bos_text and text.startswith(backend.bos_text))
    return backend.tokenize(text, add_bos=add_bos)


def _fits(backend: TextGenerator, msg: ipc.Generate, n: int) -> bool:
    return n <= _limit(backend, msg)


def _limit(backend: TextGenerator, msg: ipc.Generate) -> int:
    """Prompt tokens that leave room for the answer (its max_tokens, at most half the window)."""
    n_ctx = backend.n_ctx
    answer = min(msg.sampling.max_tokens or n_ctx // 4, n_ctx // 2)
    return min(n_ctx - answer, msg.max_prompt_tokens or n_ctx)
