"""The backend interfaces: what a model runtime implements, one small interface per job.

A backend owns one loaded model. Every backend is a :class:`Backend`: it is
loaded (:meth:`Backend.load`), has a context length, and is freed. What it
can do with its model is a separate interface:

* :class:`TextGenerator` generates text: a tokenizer, a chat template and
  the sequence cycle below;
* :class:`Embedder` turns texts into sentence vectors.

A runtime implements the ones its model supports (llama.cpp: both; an ONNX
decoder and ctransformers: generation; an ONNX BERT encoder: embeddings), so
no backend carries methods it cannot honour. The worker asks which
interface a loaded model has through :func:`generator_of` and
:func:`embedder_of`, which refuse a request the model cannot serve with
``bad_request`` before anything is queued.

The worker drives a generator from one OS thread (llama.cpp's CPU thread pool
follows the calling thread; changing threads per token costs ~3x), in this
cycle::

    start(seq, prompt_tokens, sampling)      # admit; no compute yet
    step([seq, ...]) -> {seq: token}         # one token per sequence; the first
                                             # step of a sequence also prefills
    finish(seq)                              # retire (done, cancelled, failed)

``step`` takes a list so a batching backend can advance many sequences in one
forward pass; ``max_sequences`` says how many it holds at once. A backend that
decodes one sequence at a time sets it to 1 and the worker queues the rest.
Structured output is optional: :meth:`TextGenerator.check_sampling` refuses it
unless a backend has a grammar sampler.
"""

from __future__ import annotations

import abc
from collections.abc import Generator, Sequence
from typing import Any, ClassVar, TypeAlias

import msgspec

from engine.chat import render_chat
from engine.requests import (
    ChatMessage,
    ImageOptions,
    Label,
    SamplingParams,
    SpeechOptions,
    ToolFunction,
    TranscribeOptions,
    TranscriptSegment,
)
from protocol.errors import BadRequest

__all__ = [
    "Backend",
    "ClassifyJob",
    "EmbedJob",
    "Embedder",
    "ImageClassifier",
    "ImageEmbedder",
    "ImageGenerator",
    "ImagesJob",
    "LiveBatches",
    "LoadParams",
    "SynthesizeJob",
    "Synthesizer",
    "TextGenerator",
    "TranscribeJob",
    "Transcriber",
    "classifier_of",
    "embedder_of",
    "generator_of",
    "image_embedder_of",
    "image_generator_of",
    "synthesizer_of",
    "transcriber_of",
]

# One batch of images read or classified per next(); returns each image's top labels.
ClassifyJob: TypeAlias = Generator[None, None, list[list[Label]]]
# One sampler step per next(), yielding (steps done, steps); returns (PNG files, seed).
ImagesJob: TypeAlias = Generator[tuple[int, int], None, tuple[list[bytes], int]]
# One forward pass per next(); returns (unit-length vectors, tokens read).
EmbedJob: TypeAlias = Generator[None, None, tuple[list[list[float]], int]]
# One window of audio decoded per next(), yielding its segments (none for a
# window without speech); returns (language, seconds of audio).
TranscribeJob: TypeAlias = Generator[list[TranscriptSegment], None, tuple[str, float]]
# One sentence synthesised per next(), yielding its 16-bit little-endian mono PCM;
# returns the seconds of audio produced.
SynthesizeJob: TypeAlias = Generator[bytes, None, float]


class LoadParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How to load a model.

    ``n_ctx=0`` uses the model's own length, capped at 4096: the context
    window of each sequence. ``n_seq`` is how many sequences decode together
    (backends that step one at a time ignore it). ``prefill_chunk`` bounds the
    prompt tokens of a step while other sequences decode (engine.stepplan).
    ``kv_unified`` makes llama.cpp's sequences share one cache of ``n_ctx``
    cells instead of a window each: a long conversation and a short question
    then take what they use, but every token attends over the cells of all
    sequences, which measured ~30 % slower at 8 streams on SmolLM2.
    """

    n_ctx: int = 0
    n_threads: int = 2
    n_batch: int = 512
    n_seq: int = 4
    chat_template: str | None = None  # overrides the model's own (a Modelfile TEMPLATE)
    options: msgspec.Struct | None = None  # the backend's own (its registry entry's ``options``)
    prefill_chunk: int = 64
    kv_unified: bool = False


class Backend(abc.ABC):
    """One loaded model, whatever it serves. Construct with :meth:`load`; release with :meth:`free`.

    What the model can do is a second interface the concrete class also
    implements: :class:`TextGenerator`, :class:`Embedder`, or both.
    """

    name: ClassVar[str]
    providers: Sequence[str] = ()
    """The execution providers its sessions run on, in order (ONNX backends; ``ps``)."""
    what: ClassVar[str] = "an embedding model"
    """What the model is, for errors when it is asked for another kind of job."""

    n_ctx: int
    """The most tokens one sequence (or one input to embed) may hold."""

    @classmethod
    @abc.abstractmethod
    def load(cls, path: str, params: LoadParams) -> Backend:
        """Load the model at ``path``; raise ModelLoadError on failure."""

    @abc.abstractmethod
    def free(self) -> None:
        """Release the model's memory. The backend is unusable afterwards."""


class TextGenerator(Backend):
    """A model that generates text, one token per sequence per :meth:`step`."""

    what = "a text generation model"

    max_sequences: int = 1
    # Whether :meth:`start` takes ``adapters`` (LoRA files over the loaded model).
    supports_adapters: bool = False
    # Whether the model reads images (a vision language model): then ``image_marker``
    # in a prompt is where an image goes (tokenize_with_images).
    reads_images: bool = False
    image_marker: str = ""

    def tokenize_with_images(self, text: str, images: list[bytes]) -> list[int]:
        """``text`` as tokens, each ``image_marker`` replaced by the positions of the next
        image of ``images`` (as ids the backend decodes as that image). BadRequest for
        an image it cannot read; a model that reads no images refuses them."""
        raise BadRequest(f"{self.name} models do not read images")

    chat_template: str | None
    bos_text: str
    eos_text: str

    @abc.abstractmethod
    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; control tokens written in the text are parsed."""

    @abc.abstractmethod
    def detokenize(self, tokens: Sequence[int]) -> bytes:
        """Bytes of ``tokens``; may end inside a UTF-8 character."""

    @abc.abstractmethod
    def is_end(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, EOT, ...)."""

    @abc.abstractmethod
    def start(
        self,
        seq: int,
        prompt: list[int],
        sampling: SamplingParams,
        priority: int = 0,
        urgent: bool = False,
    ) -> None:
        """Admit a sequence; compute happens in its first :meth:`step`.

        ``priority`` and ``urgent`` (it paused another sequence to start) order
        prompt reading within a step (engine.stepplan).
        """

    @abc.abstractmethod
    def step(self, seqs: Sequence[int]) -> dict[int, int]:
        """Advance the sequences together; return the new token of each that produced one.

        A sequence still reading a long prompt may produce none in a step.
        """

    def take_logprobs(self, seq: int) -> tuple[float, list[tuple[int, float]]] | None:
        """The log-probability of the token the last :meth:`step` gave ``seq``, and the
        most likely tokens with theirs (``sampling.logprobs`` of them), if it asked."""
        return None

    def failed(self) -> dict[int, Exception]:
        """Sequences the last :meth:`step` could not advance, with the reason.

        The other sequences of that step advanced normally; the worker ends these
        with an error. (A grammar that allows no token is one such case.)
        """
        return {}

    @abc.abstractmethod
    def context_used(self, seq: int) -> int:
        """Positions of the context window ``seq`` occupies (prompt + generated)."""

    @abc.abstractmethod
    def finish(self, seq: int) -> None:
        """Retire a sequence; its slot is free for the next one."""

    can_suspend: bool = False
    """Whether :meth:`suspend` and :meth:`resume` work (engine.preemption)."""

    def suspend(self, seq: int) -> None:
        """Pause a running sequence and give its slot up; :meth:`resume` continues it.

        Nothing it generated is lost or repeated: its tokens (and sampler state)
        are kept, and its cache is either still in its old slot on resume or
        recomputed from those tokens.
        """
        raise NotImplementedError

    def resume(self, seq: int) -> None:
        """Continue a suspended sequence in a free slot."""
        raise NotImplementedError

    def set_interrupt(self, address: int) -> None:
        """Let :meth:`step` stop early while the flag at ``address`` is up (engine.interrupt).

        A stopped step advances no sequence and returns no tokens. Backends
        that cannot stop a step in progress ignore this.
        """
        return None

    def prompt_reused(self, seq: int) -> int:
        """How many of ``seq``'s prompt tokens were copied from a cached prefix, not read."""
        return 0

    # -- reading ahead while idle (engine.readahead) ----------------------------------

    def anticipate(self, seq: int, turn: Sequence[int]) -> None:
        """``seq`` ended as a chat answer: its cache may go on to read its last sampled
        token (unless an end token) and ``turn``, the tokens the chat template puts
        between an answer and the next user message, whenever the worker is idle.

        Called just before :meth:`finish`. A backend that keeps no cache between
        sequences, or cannot stop a read when a request arrives, ignores it.
        """
        return None

    def reads_ahead(self) -> bool:
        """Whether anticipated tokens are waiting to be read (:meth:`read_ahead`)."""
        return False

    def read_ahead(self) -> int:
        """Read anticipated tokens into the caches of finished chats, in one step that the
        interrupt flag stops (then nothing is kept and they wait for the next idle time);
        how many tokens it read."""
        return 0

    def has_room(self, n_prompt: int) -> bool:
        """Whether a new sequence with an ``n_prompt``-token prompt fits beside the running ones.

        Backends whose sequences share one context (llama.cpp's unified KV
        cache) say no while the prompts and answers already held leave less
        than the new prompt; the worker then keeps the request queued instead
        of starting a sequence that could not be read. The default has a
        separate window per sequence.
        """
        return True

    def check_sampling(self, sampling: SamplingParams) -> None:
        """Raise BadRequest for options this backend cannot honour.

        The worker calls it before queueing a request, so a bad grammar fails at
        once instead of after waiting for a free slot. The default refuses
        structured output, which needs a backend with a grammar engine.
        """
        if sampling.constraint() is not None:
            raise BadRequest("structured output needs the llama_cpp or onnx backend")

    def render_chat(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolFunction] | None = None
    ) -> str:
        """Render messages (and tools) with the model's chat template (from its metadata)."""
        return render_chat(
            self.chat_template,
            messages,
            tools=tools,
            bos_token=self.bos_text,
            eos_token=self.eos_text,
        )

    def token_bytes(self, token: int) -> bytes:
        """Bytes of one generated token (backends may cache this)."""
        return self.detokenize([token])


class Embedder(Backend):
    """A model that turns texts into sentence vectors."""

    @abc.abstractmethod
    def embed_job(self, texts: Sequence[str], truncate: bool) -> EmbedJob:
        """Check ``texts`` now (BadRequest), and return a job that embeds them step by step.

        Each ``next()`` of the job does one forward pass; the job returns
        ``(vectors, tokens read)``, vectors of unit length in input order. The
        worker advances it between generation steps, so a large request delays
        running streams by one pass at a time, not by all of it. ``truncate``
        cuts inputs longer than the embedding context instead of refusing them.
        """

    def embed(self, texts: Sequence[str], truncate: bool) -> tuple[list[list[float]], int]:
        """Run :meth:`embed_job` to the end: ``(unit-length vectors, tokens read)``."""
        job = self.embed_job(texts, truncate)
        while True:
            try:
                next(job)
            except StopIteration as done:
                result: tuple[list[list[float]], int] = done.value
                return result


def generator_of(backend: Backend) -> TextGenerator:
    """``backend`` as a :class:`TextGenerator`; BadRequest if its model does something else."""
    if isinstance(backend, TextGenerator):
        return backend
    raise BadRequest(f"this is {backend.what}: it cannot generate text")


def embedder_of(backend: Backend) -> Embedder:
    """``backend`` as an :class:`Embedder`; BadRequest if its runtime cannot embed."""
    if isinstance(backend, Embedder):
        return backend
    raise BadRequest("embeddings need the llama_cpp backend or an ONNX encoder model")


class Transcriber(Backend):
    """A speech recognition model: audio in, timed text segments out, a window at a time."""

    what = "a speech recognition model"

    sample_rate: int
    """The rate the model reads; uploads are decoded and resampled to it."""

    @abc.abstractmethod
    def transcribe_job(self, audio: bytes, options: TranscribeOptions) -> TranscribeJob:
        """A job over ``audio`` (a file's bytes in any common format).

        Options the model cannot honour raise BadRequest at once; the audio is
        decoded in the job's first step (BadRequest for what cannot be decoded,
        TooLarge past the length limit), then each step decodes one window.
        """


class LiveBatches(abc.ABC):
    """A recogniser that transcribes short live clips (an utterance of a listen stream) in
    batches: when several streams' utterances end together, one encoder pass and one
    decoding for all of them cost much less than one each, and the last of them is not
    kept waiting behind the others. A clip is an opaque object of the backend's."""

    @abc.abstractmethod
    def live_clip(self, audio: bytes, options: TranscribeOptions) -> Any | None:
        """``audio`` decoded and prepared as a clip (BadRequest for audio that cannot be
        read); None for one too long to be a clip (it is then an ordinary job)."""

    @abc.abstractmethod
    def clip_key(self, clip: Any, stage: str) -> tuple[Any, ...]:
        """What clips must share to go through ``stage`` (``encode``, ``decode``) together."""

    @abc.abstractmethod
    def encode_clips(self, clips: list[Any]) -> None:
        """One encoder pass over ``clips`` (their results kept in them)."""

    @abc.abstractmethod
    def decode_clips(self, clips: list[Any]) -> list[tuple[str, str, float]]:
        """The text, language and seconds of each encoded clip, in order."""


def transcriber_of(backend: Backend) -> Transcriber:
    """``backend`` as a :class:`Transcriber`; BadRequest for a model that is not one."""
    if isinstance(backend, Transcriber):
        return backend
    raise BadRequest("this model does not transcribe speech (a speech recognition model does)")


class Synthesizer(Backend):
    """A speech synthesis model: text in, audio out a sentence at a time."""

    what = "a speech synthesis model"

    sample_rate: int
    """The rate of the audio it produces."""
    voice: str
    """The voice it speaks in (one model is one voice)."""

    @abc.abstractmethod
    def synthesize_job(self, text: str, options: SpeechOptions) -> SynthesizeJob:
        """A job speaking ``text``; options it cannot honour raise BadRequest at once."""


def synthesizer_of(backend: Backend) -> Synthesizer:
    """``backend`` as a :class:`Synthesizer`; BadRequest for a model that is not one."""
    if isinstance(backend, Synthesizer):
        return backend
    raise BadRequest("this model does not synthesise speech (a speech synthesis model does)")


class ImageClassifier(Backend):
    """An image classification model: images in, each one's likeliest labels out."""

    what = "an image classification model"

    labels: list[str]
    """Every label the model knows, in the order of its output."""

    @abc.abstractmethod
    def classify_job(self, images: Sequence[bytes], top_k: int) -> ClassifyJob:
        """A job classifying ``images`` (encoded files); each ``next()`` decodes or runs one
        batch. Images that cannot be read raise BadRequest / TooLarge from the job."""


def classifier_of(backend: Backend) -> ImageClassifier:
    """``backend`` as an :class:`ImageClassifier`; BadRequest for a model that is not one."""
    if isinstance(backend, ImageClassifier):
        return backend
    raise BadRequest(f"this is {backend.what}: it does not classify images")


class ImageEmbedder(Embedder):
    """A model that embeds images and texts into one space (CLIP and its kin): a text and an
    image that match have vectors with a high dot product."""

    what = "an image and text embedding model"

    @abc.abstractmethod
    def embed_images_job(self, images: Sequence[bytes]) -> EmbedJob:
        """A job embedding ``images`` (encoded files), like :meth:`Embedder.embed_job`: each
        ``next()`` decodes or embeds one batch; returns ``(unit-length vectors, 0)``."""


def image_embedder_of(backend: Backend) -> ImageEmbedder:
    """``backend`` as an :class:`ImageEmbedder`; BadRequest for a model that is not one."""
    if isinstance(backend, ImageEmbedder):
        return backend
    raise BadRequest(f"this is {backend.what}: it does not embed images")


class ImageGenerator(Backend):
    """A model that makes images (diffusion and consistency models), a sampler step at a time."""

    what = "an image generation model"

    @abc.abstractmethod
    def images_job(self, prompt: str, options: ImageOptions) -> ImagesJob:
        """A job making ``options.n`` images for ``prompt``; options the model cannot honour
        (a size it does not make, too many steps or images) raise BadRequest at once."""


def image_generator_of(backend: Backend) -> ImageGenerator:
    """``backend`` as an :class:`ImageGenerator`; BadRequest for a model that is not one."""
    if isinstance(backend, ImageGenerator):
        return backend
    raise BadRequest(f"this is {backend.what}: it does not generate images")
