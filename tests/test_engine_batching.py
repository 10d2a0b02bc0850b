"""Several sequences decoding together in one worker (one llama_decode per step)."""

from __future__ import annotations

import asyncio
import ctypes
from pathlib import Path

import llama_cpp

from engine import (
    ChatMessage,
    EngineClient,
    EngineConfig,
    FinishReason,
    GenerateRequest,
    SamplingParams,
)
from engine.backends.base import LoadParams
from engine.backends.llamacpp import LlamaCppBackend
from engine.interrupt import Interrupt

from .conftest import SCRIPT, collect


def greedy(**kw: object) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "repeat_penalty": 1.0, **kw})  # type: ignore[arg-type]


async def test_sequences_on_one_worker_decode_together(slow_model: Path) -> None:
    async with EngineClient(
        EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=4)
    ) as client:
        await client.load("slow", slow_model)
        requests = [
            GenerateRequest(model="slow", prompt=f"p{i}", sampling=greedy(max_tokens=13 * (10 + i)))
            for i in range(4)
        ]
        tasks = [asyncio.create_task(collect(client, r)) for r in requests]
        await asyncio.sleep(0.2)
        (worker,) = (await client.health()).workers
        assert worker.active == 4 and worker.queued == 0  # all four in the batch at once
        for i, (deltas, done) in enumerate(await asyncio.gather(*tasks)):
            assert "".join(d.text for d in deltas) == SCRIPT * (10 + i)
            assert done.finish_reason is FinishReason.LENGTH


async def test_a_long_prompt_is_read_in_chunks_beside_running_streams(script_model: Path) -> None:
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=2, n_batch=32)
    async with EngineClient(config) as client:
        await client.load("script", script_model)
        running = asyncio.create_task(
            collect(
                client,
                GenerateRequest(model="script", prompt="x", sampling=greedy(max_tokens=13 * 20)),
            )
        )
        await asyncio.sleep(0.01)
        long_prompt = "word " * 150 + "x"  # ~750 tokens: many chunks of 32
        deltas, done = await collect(
            client,
            GenerateRequest(model="script", prompt=long_prompt, sampling=greedy(max_tokens=13)),
        )
        assert "".join(d.text for d in deltas) == SCRIPT
        assert done.usage.prompt_tokens > 300
        deltas, _ = await running
        assert "".join(d.text for d in deltas) == SCRIPT * 20


async def test_cached_prefixes_give_the_same_tokens_as_a_fresh_start(random_model: Path) -> None:
    """A follow-up prompt that extends an earlier one reuses its KV cache; output must not change."""
    first = "Once upon a time there was"
    follow = first + " a small red fox"
    sampling = greedy(max_tokens=24)

    async def run(client: EngineClient, prompt: str) -> tuple[str, int]:
        deltas, done = await collect(
            client, GenerateRequest(model="m", prompt=prompt, sampling=sampling)
        )
        return "".join(d.text for d in deltas), done.usage.prompt_tokens

    async with EngineClient(
        EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=1)
    ) as fresh:
        await fresh.load("m", random_model)
        expected, _ = await run(fresh, follow)
    async with EngineClient(
        EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=1)
    ) as client:
        await client.load("m", random_model)
        await run(client, first)
        reused, n_prompt = await run(client, follow)
        again, _ = await run(client, follow)
    assert reused == expected == again
    assert n_prompt > 0


async def test_a_full_shared_context_ends_one_sequence_not_all(slow_model: Path) -> None:
    """With ``kv_unified`` sequences share one n_ctx-cell KV cache: when together they
    outgrow it, the one holding most cells ends with a retryable ``overloaded`` and
    the rest go on."""
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=3, kv_unified=True)
    async with EngineClient(config) as client:
        await client.load("slow", slow_model, n_ctx=256)
        # Each fits alone, and any two together; all three need 330+ cells.
        lengths = [120, 110, 100]
        results = await asyncio.gather(
            *(
                collect(
                    client,
                    GenerateRequest(
                        model="slow",
                        prompt=f"p{i}",
                        sampling=greedy(max_tokens=n, ignore_eos=True),
                    ),
                )
                for i, n in enumerate(lengths)
            )
        )
        failed = [done for _, done in results if done.error is not None]
        assert len(failed) == 1, [(d.usage.completion_tokens, d.error) for _, d in results]
        assert failed[0].error is not None and failed[0].error.code == "overloaded"
        assert failed[0].error.retryable
        for (_, done), n in zip(results, lengths, strict=True):
            if done.error is None:
                assert done.finish_reason is FinishReason.LENGTH
                assert done.usage.completion_tokens == n
        # The worker is whole: three short ones fit together.
        again = await asyncio.gather(
            *(
                collect(
                    client,
                    GenerateRequest(
                        model="slow",
                        prompt=f"q{i}",
                        sampling=greedy(max_tokens=40, ignore_eos=True),
                    ),
                )
                for i in range(3)
            )
        )
        assert all(d.error is None and d.usage.completion_tokens == 40 for _, d in again)


QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Name three colours of the rainbow.",
    "Why do birds sing in the morning?",
    "How many legs does a spider have?",
    "Write one sentence about the sea.",
]


async def answers(
    smollm2: Path,
    config: EngineConfig,
    sampling: SamplingParams,
    questions: list[str] = QUESTIONS,
) -> list[str]:
    (texts,) = await answers_each(smollm2, config, [sampling], questions)
    return texts


async def answers_each(
    smollm2: Path,
    config: EngineConfig,
    samplings: list[SamplingParams],
    questions: list[str] = QUESTIONS,
) -> list[list[str]]:
    """Every question answered at once, under each sampling in turn, by one engine."""
    out = []
    async with EngineClient(config) as client:
        await client.load("m", smollm2)
        for sampling in samplings:
            results = await asyncio.gather(
                *(
                    collect(
                        client,
                        GenerateRequest(
                            model="m", messages=[ChatMessage("user", q)], sampling=sampling
                        ),
                    )
                    for q in questions
                )
            )
            out.append(["".join(d.text for d in deltas) for deltas, _ in results])
    return out


async def test_batched_greedy_output_equals_unbatched_for_every_slot_count(
    smollm2: Path,
) -> None:
    """However many sequences share a step, greedy text is the text each prompt gets
    alone. (In one shared cache, ``kv_unified``, attention runs over other
    sequences' masked cells too, and the changed float summation order may flip
    a near tie: that layout is checked for completing, not for equal text.)"""
    sampling = greedy(max_tokens=24)
    alone = await answers(
        smollm2, EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=1), sampling
    )
    assert alone[0].startswith("The capital of France is Paris")
    for slots in (2, 3, 5):
        config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=slots)
        assert await answers(smollm2, config, sampling) == alone, slots
    # The default: slots by memory, 8 per thread (16 here), all taken by one burst.
    config = EngineConfig(workers=1, threads_per_worker=2)
    burst = QUESTIONS * 3 + QUESTIONS[:1]
    assert await answers(smollm2, config, sampling, burst) == alone * 3 + alone[:1]
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=3, kv_unified=True)
    shared = await answers(smollm2, config, sampling)
    assert shared[0] == alone[0] and all(shared)


async def test_the_greedy_repeat_penalty_matches_llama_cpps_penalty_sampler(
    smollm2: Path,
) -> None:
    """Greedy decoding applies the repeat penalty itself (numpy); a top-k 1 draw goes
    through llama.cpp's own sampler chain with the same penalty: same tokens."""
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=5)
    fast, chain, plain = await answers_each(
        smollm2,
        config,
        [
            greedy(max_tokens=28, repeat_penalty=1.5),
            SamplingParams(temperature=0.7, top_k=1, repeat_penalty=1.5, max_tokens=28, seed=1),
            greedy(max_tokens=28),
        ],
    )
    assert fast == chain
    assert fast != plain  # the penalty did change something


async def test_a_follow_up_turn_reads_only_the_new_turn(smollm2: Path) -> None:
    """The next turn repeats the model's answer as text; where that text spells the
    answer's own tokens the cache is reused, so only the new messages are read."""
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=2)
    history = [ChatMessage("user", "Tell me a short story about a lighthouse keeper.")]
    async with EngineClient(config) as client:
        await client.load("m", smollm2)
        cached: list[int] = []
        for question in ("Who was his friend?", "What happened in the storm?"):
            deltas, done = await collect(
                client,
                GenerateRequest(model="m", messages=history, sampling=greedy(max_tokens=60)),
            )
            answer = "".join(d.text for d in deltas)
            turn = done.usage.prompt_tokens + done.usage.completion_tokens
            history += [ChatMessage("assistant", answer), ChatMessage("user", question)]
            deltas, done = await collect(
                client,
                GenerateRequest(model="m", messages=history, sampling=greedy(max_tokens=1)),
            )
            # All but the last generated token (never fed) and the few template tokens.
            assert done.usage.cached_tokens >= turn - 2, (turn, done.usage)
            assert done.usage.prompt_tokens - done.usage.cached_tokens < 30
            cached.append(done.usage.cached_tokens)
        assert cached[1] > cached[0]


async def test_conversations_taking_turns_keep_their_caches(smollm2: Path) -> None:
    """Two users alternate turns, their chats opening with the same system prompt: each
    new chat goes to the lowest free slot, yet neither erases the other's history, so
    every second turn reads only its new messages (and answers as a fresh start does)."""
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=4)
    system = ChatMessage("system", "You are a helpful assistant who tells short stories.")
    chats = {
        "a": [system, ChatMessage("user", "Tell me a story about a lighthouse keeper.")],
        "b": [system, ChatMessage("user", "Tell me a story about a dragon who loved tea.")],
    }

    def turn(messages: list[ChatMessage], tokens: int) -> GenerateRequest:
        return GenerateRequest(model="m", messages=messages, sampling=greedy(max_tokens=tokens))

    async with EngineClient(config) as client:
        await client.load("m", smollm2)
        for who in ("a", "b"):
            deltas, _ = await collect(client, turn(chats[who], 60))
            chats[who] += [
                ChatMessage("assistant", "".join(d.text for d in deltas)),
                ChatMessage("user", "What happened next?"),
            ]
        seconds = {}
        for who in ("a", "b"):
            deltas, done = await collect(client, turn(chats[who], 8))
            seconds[who] = "".join(d.text for d in deltas)
            # All but the new question (and its few template tokens) came from the cache.
            assert done.usage.prompt_tokens - done.usage.cached_tokens < 20, (who, done.usage)
    async with EngineClient(config) as fresh:
        await fresh.load("m", smollm2)
        for who in ("a", "b"):
            deltas, _ = await collect(fresh, turn(chats[who], 8))
            assert "".join(d.text for d in deltas) == seconds[who]


async def test_a_short_exchange_keeps_its_cache_when_another_chat_starts(smollm2: Path) -> None:
    """A chat of one short exchange (a few dozen tokens past the shared system prompt),
    then another user's new chat in the same slot: the first chat's cache moves aside,
    so its next turn reads only its new question."""
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=4)
    system = ChatMessage("system", "You are a helpful assistant who answers briefly.")
    a = [system, ChatMessage("user", "What colour is the sky on a clear day?")]

    def turn(messages: list[ChatMessage], tokens: int) -> GenerateRequest:
        return GenerateRequest(model="m", messages=messages, sampling=greedy(max_tokens=tokens))

    async with EngineClient(config) as client:
        await client.load("m", smollm2)
        deltas, done = await collect(client, turn(a, 6))
        first_read = done.usage.prompt_tokens - done.usage.cached_tokens
        a += [
            ChatMessage("assistant", "".join(d.text for d in deltas)),
            ChatMessage("user", "And at night?"),
        ]
        # Another user's chat, sharing only the system prompt, lands in the same slot.
        await collect(client, turn([system, ChatMessage("user", "Name a fruit.")], 4))
        _, done = await collect(client, turn(a, 4))
    # What the first turn read (its question) is not read again: only the new messages.
    reread = done.usage.prompt_tokens - done.usage.cached_tokens
    assert first_read >= 10 and reread < first_read, (first_read, done.usage)


async def test_a_prompt_borrows_a_shared_prefix_from_a_busy_slot(random_model: Path) -> None:
    """Two chats with the same long opening: the second copies the first's cache of it
    (the first still running in another slot) and reads only its own question; its
    output equals a fresh start's."""
    opening = "You are a careful assistant who answers briefly and politely. " * 4
    first = opening + "Tell me about foxes."
    second = opening + "Tell me about owls."
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=2)

    async def alone(prompt: str) -> str:
        async with EngineClient(config) as fresh:
            await fresh.load("m", random_model)
            deltas, _ = await collect(
                fresh, GenerateRequest(model="m", prompt=prompt, sampling=greedy(max_tokens=16))
            )
        return "".join(d.text for d in deltas)

    expected = await alone(second)
    async with EngineClient(config) as client:
        await client.load("m", random_model)
        long_run = client.generate(
            GenerateRequest(
                model="m", prompt=first, sampling=greedy(max_tokens=400, ignore_eos=True)
            )
        )
        await anext(long_run)  # the first is running: its slot holds the opening
        deltas, done = await collect(
            client, GenerateRequest(model="m", prompt=second, sampling=greedy(max_tokens=16))
        )
        await long_run.aclose()
    assert "".join(d.text for d in deltas) == expected
    # The opening came from the running sequence's cache; only the question was read.
    assert done.usage.cached_tokens >= 32, done.usage
    assert done.usage.prompt_tokens - done.usage.cached_tokens < done.usage.prompt_tokens // 2


def test_an_interrupted_step_advances_nothing_and_changes_no_output(random_model: Path) -> None:
    """With the interrupt flag up, a llama.cpp step stops and returns no token; the
    cache keeps nothing of it, so the next steps give exactly the uninterrupted text."""
    prompts = ["Once upon a time", "The quick brown fox", "In a hole in the ground"]

    def run(interrupt_every: int) -> tuple[list[list[int]], int]:
        backend = LlamaCppBackend.load(str(random_model), LoadParams(n_threads=1, n_seq=3))
        flag = Interrupt.create()
        backend.set_interrupt(flag.address)
        out: list[list[int]] = [[] for _ in prompts]
        stopped = 0
        try:
            for i, text in enumerate(prompts):
                backend.start(i, backend.tokenize(text), greedy(max_tokens=20))
            for n in range(40):
                if interrupt_every and n % interrupt_every == 1:
                    flag.set()
                    assert backend.step([0, 1, 2]) == {}
                    stopped += 1
                    flag.clear()
                for seq, token in backend.step([0, 1, 2]).items():
                    out[seq].append(token)
        finally:
            backend.free()
            flag.close()
        return out, stopped

    plain, _ = run(0)
    interrupted, stopped = run(3)
    assert stopped > 10
    assert interrupted == plain
    assert all(len(tokens) == 40 for tokens in plain)


def test_a_step_interrupted_after_part_of_its_micro_batches_leaves_no_cells(
    random_model: Path,
) -> None:
    """A step of a prompt beside decoding sequences runs as several micro-batches; one
    stopped in its last micro-batch must still leave the cache as before the step
    (else the next step is refused: positions must follow the cache's)."""
    prompts = ["Once upon a time", "The quick brown fox"]
    late = "In a hole in the ground there lived a hobbit, not a nasty dirty wet hole"

    def run(stop_late: bool) -> list[list[int]]:
        backend = LlamaCppBackend.load(str(random_model), LoadParams(n_threads=1, n_seq=3))
        out: list[list[int]] = [[] for _ in range(3)]
        calls = 0
        limit = 0

        def check(_: object) -> bool:
            nonlocal calls
            calls += 1
            return bool(limit) and calls >= limit

        callback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p)(check)
        llama_cpp.llama_set_abort_callback(backend._ctx, callback, None)  # type: ignore[attr-defined]
        try:
            for i, text in enumerate(prompts):
                backend.start(i, backend.tokenize(text), greedy(max_tokens=20))
            for _ in range(3):
                for seq, token in backend.step([0, 1]).items():
                    out[seq].append(token)
            backend.start(2, backend.tokenize(late), greedy(max_tokens=20))
            if stop_late:
                # Count the checks of this uneven step, then stop the same step near its end.
                calls = 0
                probe = LlamaCppBackend.load(str(random_model), LoadParams(n_threads=1, n_seq=3))
                try:
                    llama_cpp.llama_set_abort_callback(probe._ctx, callback, None)  # type: ignore[attr-defined]
                    for i, text in enumerate(prompts):
                        probe.start(i, probe.tokenize(text), greedy(max_tokens=20))
                    for _ in range(3):
                        probe.step([0, 1])
                    probe.start(2, probe.tokenize(late), greedy(max_tokens=20))
                    calls = 0
                    probe.step([0, 1, 2])
                    per_step = calls
                finally:
                    probe.free()
                calls, limit = 0, per_step - 3
                assert backend.step([0, 1, 2]) == {}
                limit = 0
            for _ in range(10):
                for seq, token in backend.step([0, 1, 2]).items():
                    out[seq].append(token)
        finally:
            backend.free()
        return out

    assert run(stop_late=True) == run(stop_late=False)


async def test_ignore_eos_never_chooses_an_end_token(eos_model: Path) -> None:
    """With ``ignore_eos`` the end-of-generation tokens are never chosen (as llama.cpp's
    own ignore_eos): a model that says "Done." and then ends goes on with text for all
    of ``max_tokens``, greedy (numpy) and sampled (llama.cpp's chain) alike. Without
    it, the same model ends after "Done."."""
    n = 16
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=2)
    async with EngineClient(config) as client:
        await client.load("eos", eos_model)
        plain = GenerateRequest(model="eos", prompt="x", sampling=greedy(max_tokens=n))
        deltas, done = await collect(client, plain)
        assert done.finish_reason is FinishReason.STOP and "".join(d.text for d in deltas)
        end_id = 2  # the tiny vocabulary's end of sequence
        for sampling in (
            greedy(max_tokens=n, ignore_eos=True),
            SamplingParams(temperature=0.8, seed=3, max_tokens=n, ignore_eos=True),
        ):
            request = GenerateRequest(model="eos", prompt="x", sampling=sampling, token_ids=True)
            deltas, done = await collect(client, request)
            ids = [t for d in deltas for t in d.token_ids or ()]
            assert done.usage.completion_tokens == n and len(ids) == n, sampling
            assert end_id not in ids, (sampling, ids)
