"""Which worker a request prefers: where its conversation or its prompt's prefix is.

Pure (engine.placement); the engine-level test of a follow-up turn going home
is in tests/test_fair_admission.py.
"""

from __future__ import annotations

from engine.placement import BLOCK, Affinity
from engine.requests import ChatMessage, GenerateRequest


def _raw(prompt: str, model: str = "m") -> GenerateRequest:
    return GenerateRequest(model=model, prompt=prompt, request_id="r")


def test_a_raw_prompt_continued_or_sharing_an_opening_prefers_its_worker() -> None:
    aff = Affinity()
    story = "".join(f"line {i} of a long story.\n" for i in range(200))  # ~5,000 characters
    aff.served(_raw(story), 1)
    # Its continuation (the prompt, the completion, more text): the same worker.
    assert aff.preferred(_raw(story + " And then the fox said: ")) == 1
    # A prompt that shares only its opening (more than a block of it): still there.
    assert aff.preferred(_raw(story[: BLOCK + 10] + "a different ending" * 20)) == 1
    # Less than a block in common, another model, or a short prompt: no preference.
    assert aff.preferred(_raw(story[: BLOCK - 1] + "z" * 2 * BLOCK)) is None
    assert aff.preferred(_raw(story, model="other")) is None
    aff.served(_raw("short"), 0)
    assert aff.preferred(_raw("short and more")) is None
    # A later prompt that extends it further, served elsewhere, wins its own prefix.
    aff.served(_raw(story + "x" * 3 * BLOCK), 2)
    assert aff.preferred(_raw(story + "x" * 3 * BLOCK + "y")) == 2


def test_conversations_prefer_the_worker_of_their_history_and_memory_is_bounded() -> None:
    aff = Affinity(capacity=8)
    turn1 = [ChatMessage("user", "hello")]
    aff.served(GenerateRequest(model="m", messages=turn1, request_id="a"), 1)
    follow = [*turn1, ChatMessage("assistant", "hi!"), ChatMessage("user", "and then?")]
    assert aff.preferred(GenerateRequest(model="m", messages=follow, request_id="b")) == 1
    for i in range(100):
        aff.served(_raw(f"{i} " + "w" * 40 * BLOCK), 0)
    assert len(aff._where) <= 8
    assert aff.preferred(GenerateRequest(model="m", messages=follow, request_id="c")) is None
