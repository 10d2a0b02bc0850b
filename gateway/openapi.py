"""``GET /openapi.json``: an OpenAPI 3.1 document for the native and OpenAI-compatible surfaces.

Request bodies come from the same msgspec Structs the routes decode with, so
the document cannot drift from what the server accepts; responses that are
built as plain JSON are described by hand, briefly. The Ollama surface is not
included: Ollama publishes no OpenAPI document of its own, and its clients do
not use one.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.generate_routes import ChatBody, GenerateBody, GenerationResult
from gateway.image_routes import ClassifyBody, ImagesBody
from gateway.model_routes import CopyBody, CreateBody, ModelBody, PullBody
from gateway.openai_api import ChatCompletionRequest, CompletionRequest, EmbeddingsRequest
from protocol import messages as m

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{name}"


def _json_body(name: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": _REF.format(name=name)}}},
    }


def _speech_op(summary: str, errors: Any) -> Any:
    form = {
        "type": "object",
        "required": ["file", "model"],
        "properties": {
            "file": {"type": "string", "format": "binary"},
            "model": {"type": "string"},
            "language": {"type": "string"},
            "prompt": {"type": "string"},
            "temperature": {"type": "number", "minimum": 0, "maximum": 1},
            "response_format": {"enum": ["json", "text", "srt", "vtt", "verbose_json"]},
            "timestamp_granularities[]": {
                "type": "array",
                "items": {"enum": ["word", "segment"]},
            },
            "stream": {"type": "boolean"},
        },
    }
    ok = _ok("transcription", sse=True)
    ok["content"]["text/plain"] = {"schema": {"type": "string"}}
    return {
        "post": {
            "summary": summary,
            "tags": ["openai"],
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}},
            "responses": {"200": ok, **errors},
            "security": [{"bearer": []}],
        }
    }


def _ok(description: str, schema: dict[str, Any] | None = None, *, sse: bool = False) -> Any:
    content: dict[str, Any] = {"application/json": {"schema": schema or {"type": "object"}}}
    if sse:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    return {"description": description, "content": content}


_NATIVE_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "retryable": {"type": "boolean"},
            },
            "required": ["code", "message"],
        }
    },
}
_OPENAI_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type"],
        }
    },
}


def _errors(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        status: {"description": text, "content": {"application/json": {"schema": schema}}}
        for status, text in (
            ("400", "invalid request (the message names the field)"),
            ("401", "missing or invalid credential"),
            ("404", "unknown model"),
            ("413", "body too large"),
            ("429", "rate limited"),
            ("503", "overloaded or shutting down"),
        )
    }


def openapi_document(version: str) -> dict[str, Any]:
    """The document; built once per process (it depends only on the code)."""
    structs: list[Any] = [
        GenerateBody,
        ChatBody,
        GenerationResult,
        PullBody,
        CopyBody,
        CreateBody,
        ModelBody,
        ChatCompletionRequest,
        CompletionRequest,
        EmbeddingsRequest,
        ClassifyBody,
        ImagesBody,
        m.Started,
        m.Delta,
        m.Done,
        m.Error,
    ]
    _, components = msgspec.json.schema_components(structs, ref_template=_REF)
    native_err = _errors(_NATIVE_ERROR)
    openai_err = _errors(_OPENAI_ERROR)
    result = {"$ref": _REF.format(name="GenerationResult")}

    def op(summary: str, body: str | None, ok: Any, errors: dict[str, Any], tag: str) -> Any:
        out: dict[str, Any] = {
            "summary": summary,
            "tags": [tag],
            "responses": {"200": ok, **errors},
            "security": [{"bearer": []}],
        }
        if body is not None:
            out["requestBody"] = _json_body(body)
        return out

    paths: dict[str, Any] = {
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "tags": ["native"],
                "responses": {"200": _ok("the process is up")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: every worker answers and the server is not draining",
                "tags": ["native"],
                "responses": {"200": _ok("ready"), "503": _ok("not ready")},
            }
        },
        "/v1/generate": {
            "post": op(
                "Complete a raw prompt (JSON, or SSE events started/delta/done with stream)",
                "GenerateBody",
                _ok("the answer", result, sse=True),
                native_err,
                "native",
            )
        },
        "/v1/chat": {
            "post": op(
                "Chat with the model's template (JSON, or SSE with stream)",
                "ChatBody",
                _ok("the answer", result, sse=True),
                native_err,
                "native",
            )
        },
        "/v1/models": {
            "get": op(
                "Stored and configured models (OpenAI list shape) and the catalog",
                None,
                _ok("models"),
                native_err,
                "models",
            )
        },
        "/v1/models/{name}": {
            "get": op(
                "A model's manifest and Modelfile", None, _ok("the model"), native_err, "models"
            ),
            "delete": op("Unload and remove a model", None, _ok("removed"), native_err, "models"),
        },
        "/v1/models/pull": {
            "post": op(
                "Pull a model (SSE progress events unless stream is false)",
                "PullBody",
                _ok("progress", sse=True),
                native_err,
                "models",
            )
        },
        "/v1/models/copy": {
            "post": op(
                "Copy a model under another name", "CopyBody", _ok("the copy"), native_err, "models"
            )
        },
        "/v1/models/create": {
            "post": op(
                "Create a model from a Modelfile",
                "CreateBody",
                _ok("the model"),
                native_err,
                "models",
            )
        },
        "/v1/models/unload": {
            "post": op("Unload a model now", "ModelBody", _ok("unloaded"), native_err, "models")
        },
        "/v1/ps": {"get": op("Loaded models", None, _ok("loaded models"), native_err, "models")},
        "/v1/video/analyze": {
            "post": {
                "summary": "Analyse a video (multipart: file, model, task classify|embed, every, "
                "top_k, asr_model, stream): frames and soundtrack with timestamps",
                "tags": ["native"],
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["file", "model"],
                                "properties": {
                                    "file": {"type": "string", "format": "binary"},
                                    "model": {"type": "string"},
                                    "task": {"enum": ["classify", "embed"]},
                                    "every": {"type": "number", "minimum": 0.1},
                                    "top_k": {"type": "integer", "minimum": 1},
                                    "asr_model": {"type": "string"},
                                    "stream": {"type": "boolean"},
                                },
                            }
                        }
                    },
                },
                "responses": {"200": _ok("frames and transcript", sse=True), **native_err},
                "security": [{"bearer": []}],
            }
        },
        "/v1/video/jobs/{id}": {
            "get": op(
                "A video job's events as SSE, from Last-Event-ID (or ?after=N)",
                None,
                _ok("events", sse=True),
                native_err,
                "native",
            ),
            "delete": op(
                "Stop a video job", None, {"description": "stopped"}, native_err, "native"
            ),
        },
        "/v1/classify": {
            "post": op(
                "Classify images (base64 or data URLs): each one's top labels with probabilities",
                "ClassifyBody",
                _ok("labels per image, in order"),
                native_err,
                "native",
            )
        },
        "/v1/chat/completions": {
            "post": op(
                "OpenAI chat completions (JSON, or SSE ending in data: [DONE])",
                "ChatCompletionRequest",
                _ok("chat.completion", sse=True),
                openai_err,
                "openai",
            )
        },
        "/v1/completions": {
            "post": op(
                "OpenAI text completions",
                "CompletionRequest",
                _ok("text_completion", sse=True),
                openai_err,
                "openai",
            )
        },
        "/v1/embeddings": {
            "post": op(
                "OpenAI embeddings (float or base64)",
                "EmbeddingsRequest",
                _ok("embeddings"),
                openai_err,
                "openai",
            )
        },
        "/v1/audio/transcriptions": _speech_op(
            "Speech to text (multipart: file, model, language, prompt, temperature, "
            "response_format json|text|srt|vtt|verbose_json, timestamp_granularities[], stream)",
            openai_err,
        ),
        "/v1/audio/speech": {
            "post": {
                "summary": "Text to speech, streamed as it is made (mp3, opus, aac, flac, wav, pcm)",
                "tags": ["openai"],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["model", "input"],
                                "properties": {
                                    "model": {"type": "string"},
                                    "input": {"type": "string", "maxLength": 4096},
                                    "voice": {"type": "string"},
                                    "speed": {"type": "number", "minimum": 0.5, "maximum": 2},
                                    "response_format": {
                                        "enum": ["mp3", "opus", "aac", "flac", "wav", "pcm"]
                                    },
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "the audio",
                        "content": {"audio/*": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    **openai_err,
                },
                "security": [{"bearer": []}],
            }
        },
        "/v1/images/generations": {
            "post": op(
                "OpenAI image generation (b64_json PNG files; seed and steps as extensions)",
                "ImagesBody",
                _ok("images"),
                openai_err,
                "openai",
            )
        },
        "/v1/audio/translations": _speech_op(
            "Speech in any language to English text (multipart, as transcriptions)", openai_err
        ),
    }
    paths["/v1/models/{name}"]["get"]["parameters"] = paths["/v1/models/{name}"]["delete"][
        "parameters"
    ] = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    job = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
    for method in ("get", "delete"):
        paths["/v1/video/jobs/{id}"][method]["parameters"] = job
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "FerrousForge",
            "version": version,
            "description": "Native and OpenAI-compatible HTTP APIs. The WebSocket protocol is "
            "described in protocol/schema.json; the Ollama-compatible API follows Ollama's.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
