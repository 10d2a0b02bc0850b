"""Modelfile parsing and rendering: Ollama's syntax, typed parameters, errors that point at a line."""

from __future__ import annotations

import random

import pytest

from engine.store.errors import ModelfileError, StoreError
from engine.store.modelfile import (
    LIST_PARAMETERS,
    PARAMETERS,
    Message,
    Modelfile,
    parse_modelfile,
    parse_parameter,
    render_modelfile,
)
from protocol.errors import ErrorCode

FULL = '''# A chat model built on SmolLM2.
FROM hf.co/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q8_0
ADAPTER ./lora.gguf

PARAMETER temperature 0.7
PARAMETER num_ctx 4096
PARAMETER stop <|im_end|>
PARAMETER stop "<|im_start|>"
PARAMETER penalize_newline false
PARAMETER seed -42
TEMPLATE """{% for message in messages %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
SYSTEM """You are a "helpful" assistant."""
MESSAGE user Is Toronto in Canada?
MESSAGE assistant yes
MESSAGE user "Is Sacramento in Canada?"
MESSAGE assistant no
LICENSE """Apache License
Version 2.0"""
LICENSE """MIT License"""
'''

FULL_EXPECTED = Modelfile(
    from_="hf.co/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q8_0",
    adapter="./lora.gguf",
    parameters={
        "temperature": 0.7,
        "num_ctx": 4096,
        "stop": ["<|im_end|>", "<|im_start|>"],
        "penalize_newline": False,
        "seed": -42,
    },
    template=(
        "{% for message in messages %}<|im_start|>{{ message.role }}\n"
        "{{ message.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}"
    ),
    system='You are a "helpful" assistant.',
    messages=[
        Message("user", "Is Toronto in Canada?"),
        Message("assistant", "yes"),
        Message("user", "Is Sacramento in Canada?"),
        Message("assistant", "no"),
    ],
    license=["Apache License\nVersion 2.0", "MIT License"],
)


def parse_error(text: str, *, source: str = "Modelfile") -> ModelfileError:
    with pytest.raises(ModelfileError) as info:
        parse_modelfile(text, source=source)
    return info.value


# --- parsing -------------------------------------------------------------------------------


def test_full_example_parses_and_round_trips() -> None:
    mf = parse_modelfile(FULL)
    assert mf == FULL_EXPECTED
    assert isinstance(mf.parameters["temperature"], float)
    assert isinstance(mf.parameters["num_ctx"], int)
    assert mf.parameters["penalize_newline"] is False
    rendered = render_modelfile(mf)
    assert rendered.startswith("FROM hf.co/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q8_0\n")
    assert rendered.endswith("\n")
    assert "PARAMETER stop <|im_end|>\nPARAMETER stop <|im_start|>\n" in rendered
    assert 'TEMPLATE """{% for message in messages %}' in rendered
    assert parse_modelfile(rendered) == mf
    assert render_modelfile(parse_modelfile(rendered)) == rendered


def test_minimal_modelfile_has_empty_defaults() -> None:
    mf = parse_modelfile("FROM smollm2\n")
    assert mf == Modelfile(from_="smollm2")
    assert mf.parameters == {} and mf.messages == [] and mf.license == []
    assert mf.template is None and mf.system is None and mf.adapter is None
    assert Modelfile(from_="a").parameters is not Modelfile(from_="b").parameters


def test_directives_parameter_names_and_roles_are_case_insensitive() -> None:
    text = (
        "from llama3\n"
        "Parameter Temperature 1\n"
        "pArAmEtEr STOP END\n"
        "system be brief\n"
        "message USER hi\n"
        "License MIT\n"
    )
    assert parse_modelfile(text) == Modelfile(
        from_="llama3",
        parameters={"temperature": 1.0, "stop": ["END"]},
        system="be brief",
        messages=[Message("user", "hi")],
        license=["MIT"],
    )


def test_comments_blank_lines_and_surrounding_whitespace_are_ignored() -> None:
    text = (
        "\n"
        "# leading comment\n"
        "   # indented comment\n"
        "\n"
        "   FROM   ./models/tiny.gguf   \n"
        "\t\n"
        "SYSTEM   you answer # in French  \n"
        "# trailing comment"
    )
    mf = parse_modelfile(text)
    assert mf.from_ == "./models/tiny.gguf"
    assert mf.system == "you answer # in French"  # '#' is a comment only at line start


def test_crlf_line_endings_and_bom_are_accepted() -> None:
    text = '\ufeffFROM base\r\nTEMPLATE """a\r\nb"""\r\nPARAMETER top_k 40\r\n'
    mf = parse_modelfile(text)
    assert mf == Modelfile(from_="base", template="a\nb", parameters={"top_k": 40})


def test_double_quoted_values_understand_escapes() -> None:
    text = (
        'FROM "/models/my model.gguf"\n'
        r'PARAMETER stop "\n\nUser:"' + "\n"
        r'PARAMETER stop "say \"hi\"\tnow"' + "\n"
        r'SYSTEM "line one\nline two \\ done"' + "\n"
        r'MESSAGE user "C:\models\x"' + "\n"
        'PARAMETER temperature "0.5"\n'
        'LICENSE ""\n'
    )
    mf = parse_modelfile(text)
    assert mf.from_ == "/models/my model.gguf"
    assert mf.parameters["stop"] == ["\n\nUser:", 'say "hi"\tnow']
    assert mf.parameters["temperature"] == 0.5
    assert mf.system == "line one\nline two \\ done"
    assert mf.messages == [Message("user", "C:\\models\\x")]  # unknown escapes stay as written
    assert mf.license == [""]


def test_triple_quoted_strings_are_verbatim() -> None:
    text = (
        'FROM base\nTEMPLATE """\n'
        "  {{ .System }} \\n # not a comment\n"
        '"quoted"\n'
        '"""\n'
        'SYSTEM """one line"""\n'
        'MESSAGE assistant """two\nlines"""\n'
    )
    mf = parse_modelfile(text)
    assert mf.template == '\n  {{ .System }} \\n # not a comment\n"quoted"\n'
    assert mf.system == "one line"
    assert mf.messages == [Message("assistant", "two\nlines")]


def test_parameter_values_are_typed() -> None:
    text = "\n".join(
        [
            "FROM base",
            "PARAMETER num_predict -1",
            "PARAMETER top_p 1",
            "PARAMETER min_p .05",
            "PARAMETER mirostat_eta 1e-3",
            "PARAMETER penalize_newline TRUE",
            "PARAMETER repeat_penalty 1.1",
        ]
    )
    assert parse_modelfile(text).parameters == {
        "num_predict": -1,
        "top_p": 1.0,
        "min_p": 0.05,
        "mirostat_eta": 0.001,
        "penalize_newline": True,
        "repeat_penalty": 1.1,
    }


def test_parse_parameter_directly() -> None:
    assert parse_parameter("NUM_CTX", " 2048 ") == 2048
    assert parse_parameter("temperature", "0") == 0.0
    assert parse_parameter("penalize_newline", "0") is False
    assert parse_parameter("stop", "###") == "###"
    assert set(PARAMETERS) >= {"num_ctx", "stop", "penalize_newline"}
    assert "stop" in LIST_PARAMETERS and len(LIST_PARAMETERS) == 1
    with pytest.raises(ValueError, match=r"expects an integer, got '1\.5'"):
        parse_parameter("num_ctx", "1.5")
    with pytest.raises(ValueError, match="expects true or false"):
        parse_parameter("penalize_newline", "maybe")
    with pytest.raises(ValueError, match="expects a number, got 'nan'"):
        parse_parameter("presence_penalty", "nan")
    with pytest.raises(ValueError, match="non-empty"):
        parse_parameter("stop", "")
    with pytest.raises(ValueError, match="unknown parameter 'topk'; did you mean 'top_k'"):
        parse_parameter("topk", "1")


# --- rendering -----------------------------------------------------------------------------

ROUND_TRIP_CASES = [
    Modelfile(from_="smollm2"),
    Modelfile(from_="/path with spaces/model.gguf", adapter="#weird adapter"),
    Modelfile(
        from_="https://example.com/m.gguf",
        parameters={
            "stop": ["\n", 'say "x"', "# heading", "a b", "<eos>"],
            "temperature": 0.1,
            "mirostat_tau": 5.0,
            "seed": 12345678901234567890,
            "num_predict": -2,
            "penalize_newline": True,
            "frequency_penalty": -1.5e-07,
        },
    ),
    Modelfile(
        from_="base",
        template='{{ if .System }}"""{{ .System }}"""{{ end }}',  # needs the escaped form
        system='ends with a quote"',
        license=["", "line\r\nwith crlf", "tab\there"],
    ),
    Modelfile(
        from_="base",
        template="\n  leading and trailing whitespace  \n",
        system="",
        messages=[
            Message("system", ""),
            Message("user", "multi\nline"),
            Message("assistant", "  padded  "),
            Message("user", "back\\slash"),
            Message("assistant", '"""'),
        ],
    ),
]


@pytest.mark.parametrize("mf", ROUND_TRIP_CASES)
def test_render_then_parse_round_trips(mf: Modelfile) -> None:
    text = render_modelfile(mf)
    assert text.startswith("FROM ") and text.endswith("\n")
    assert parse_modelfile(text) == mf


def test_render_layout() -> None:
    mf = Modelfile(
        from_="base",
        parameters={"stop": ["a b", "c"], "top_k": 40},
        template="{{ x }}",
        system='has """ inside',
        messages=[Message("user", "hello there")],
        license=["MIT"],
    )
    assert render_modelfile(mf) == (
        "FROM base\n"
        'PARAMETER stop "a b"\n'
        "PARAMETER stop c\n"
        "PARAMETER top_k 40\n"
        'TEMPLATE """{{ x }}"""\n'
        'SYSTEM "has \\"\\"\\" inside"\n'
        'MESSAGE user "hello there"\n'
        'LICENSE """MIT"""\n'
    )


def test_render_round_trips_random_strings() -> None:
    rng = random.Random(1234)
    pieces = ["a", " ", "\n", "\r", "\r\n", "\t", '"', '"""', "\\", "#", "{%", "\u2028", "\x0b"]

    def text(nonempty: bool = False) -> str:
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
        return s or ("x" if nonempty else "")

    for _ in range(500):
        mf = Modelfile(
            from_=text(nonempty=True),
            parameters={"stop": [text(nonempty=True) for _ in range(rng.randint(1, 3))]},
            template=rng.choice([None, text()]),
            system=rng.choice([None, text()]),
            messages=[Message(rng.choice(["system", "user", "assistant"]), text())],
            license=[text() for _ in range(rng.randint(0, 2))],
            adapter=rng.choice([None, text(nonempty=True)]),
        )
        assert parse_modelfile(render_modelfile(mf)) == mf


# --- errors --------------------------------------------------------------------------------


def test_modelfile_error_is_a_bad_request_store_error() -> None:
    err = parse_error("SYSTEM hi\n", source="my.Modelfile")
    assert isinstance(err, StoreError)
    assert err.reason == "invalid"
    assert err.code == ErrorCode.BAD_REQUEST
    assert err.code.value == "bad_request"
    assert str(err).startswith("my.Modelfile:1 (FROM): ")


def test_missing_from() -> None:
    err = parse_error("# nothing\nSYSTEM hi\n\nPARAMETER seed 1\n")
    assert (err.line, err.directive) == (4, "FROM")
    assert err.detail == "a Modelfile needs a FROM line"
    assert parse_error("").line == 0


def test_a_second_from_is_the_projector_and_a_third_is_refused() -> None:
    mf = parse_modelfile("FROM a\n\nFROM ./mmproj.gguf\n")
    assert (mf.from_, mf.projector) == ("a", "./mmproj.gguf")
    assert parse_modelfile(render_modelfile(mf)) == mf
    err = parse_error("FROM a\nFROM b\nFROM c\n")
    assert (err.line, err.directive) == (3, "FROM")
    assert "at most two FROM" in err.detail


def test_unknown_directive() -> None:
    err = parse_error("FROM a\nPARAMTER seed 1\n")
    assert (err.line, err.directive) == (2, "PARAMTER")
    assert err.detail == "unknown directive 'PARAMTER'; did you mean PARAMETER?"
    err = parse_error("FROM a\n{{ .Prompt }}\n")
    assert (err.line, err.directive) == (2, "")
    assert "expected a directive" in err.detail


def test_unknown_parameter_suggests_the_closest_name() -> None:
    err = parse_error("FROM a\nPARAMETER tempreature 0.5\n")
    assert (err.line, err.directive) == (2, "PARAMETER")
    assert err.detail == "unknown parameter 'tempreature'; did you mean 'temperature'?"
    assert "Modelfile:2 (PARAMETER): unknown parameter 'tempreature'" in str(err)


def test_bad_parameter_type() -> None:
    err = parse_error("FROM a\n\nPARAMETER temperature hot\n")
    assert (err.line, err.directive) == (3, "PARAMETER")
    assert err.detail == "PARAMETER temperature expects a number, got 'hot'"
    err = parse_error("FROM a\nPARAMETER num_ctx 2k\n")
    assert err.detail == "PARAMETER num_ctx expects an integer, got '2k'"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("temperature -0.1", "PARAMETER temperature must be >= 0, got -0.1"),
        ("top_p 1.5", "PARAMETER top_p must be between 0 and 1, got 1.5"),
        ("min_p -1", "PARAMETER min_p must be between 0 and 1, got -1"),
        ("typical_p 2", "PARAMETER typical_p must be between 0 and 1, got 2"),
        ("top_k -1", "PARAMETER top_k must be >= 0, got -1"),
        ("num_ctx 0", "PARAMETER num_ctx must be >= 1, got 0"),
        ("num_predict -3", "PARAMETER num_predict must be >= -2 (-1 means no limit), got -3"),
        ("repeat_penalty 0", "PARAMETER repeat_penalty must be > 0, got 0"),
    ],
)
def test_out_of_range_parameter(line: str, expected: str) -> None:
    err = parse_error(f"FROM a\nPARAMETER {line}\n")
    assert (err.line, err.directive, err.detail) == (2, "PARAMETER", expected)


def test_repeated_single_valued_parameter() -> None:
    err = parse_error("FROM a\nPARAMETER seed 1\nPARAMETER SEED 2\n")
    assert (err.line, err.directive) == (3, "PARAMETER")
    assert err.detail == "PARAMETER seed is already set (on line 2)"


def test_bad_message_role() -> None:
    err = parse_error("FROM a\nMESSAGE user hi\nMESSAGE bot hello\n")
    assert (err.line, err.directive) == (3, "MESSAGE")
    assert err.detail == "MESSAGE role must be one of system, user, assistant, got 'bot'"


def test_unterminated_triple_quote_reports_the_start_line() -> None:
    err = parse_error('FROM a\nSYSTEM hi\nTEMPLATE """{{ .Prompt }}\nmore\n\nPARAMETER seed 1\n')
    assert (err.line, err.directive) == (3, "TEMPLATE")
    assert err.detail.startswith('unterminated triple-quoted string: no closing """')
    assert "starts on line 3" in err.detail


def test_unterminated_double_quote() -> None:
    err = parse_error('FROM a\nMESSAGE user "hello\nthere"\n')
    assert (err.line, err.directive) == (2, "MESSAGE")
    assert err.detail.startswith("unterminated double-quoted string")
    err = parse_error('FROM a\nPARAMETER stop "ends in a backslash\\"\n')
    assert (err.line, err.directive) == (2, "PARAMETER")


def test_text_after_a_closing_quote() -> None:
    err = parse_error('FROM a\nSYSTEM """multi\nline""" extra\n')
    assert (err.line, err.directive) == (3, "SYSTEM")
    assert err.detail == "unexpected text after the closing quote: 'extra'"
    err = parse_error('FROM a\nPARAMETER stop "a" "b"\n')
    assert (err.line, err.detail) == (2, "unexpected text after the closing quote: '\"b\"'")


@pytest.mark.parametrize(
    ("text", "line", "directive", "detail"),
    [
        ("FROM\n", 1, "FROM", "FROM needs a model name, path or URL"),
        ('FROM ""\n', 1, "FROM", "FROM needs a model name, path or URL"),
        ("FROM a\nSYSTEM   \n", 2, "SYSTEM", "SYSTEM needs a system message"),
        ("FROM a\nparameter\n", 2, "PARAMETER", "PARAMETER needs a name and a value"),
        ("FROM a\nPARAMETER num_ctx\n", 2, "PARAMETER", "PARAMETER num_ctx needs a value"),
        ("FROM a\nMESSAGE user  \n", 2, "MESSAGE", "MESSAGE user needs content"),
        ("FROM a\nLICENSE\n", 2, "LICENSE", "LICENSE needs license text"),
    ],
)
def test_directive_without_argument(text: str, line: int, directive: str, detail: str) -> None:
    err = parse_error(text)
    assert (err.line, err.directive, err.detail) == (line, directive, detail)


def test_duplicate_system() -> None:
    err = parse_error('FROM a\nSYSTEM one\nTEMPLATE x\nsystem """two"""\n')
    assert (err.line, err.directive) == (4, "SYSTEM")
    assert err.detail == "only one SYSTEM is allowed (the first is on line 2)"


@pytest.mark.parametrize("directive", ["TEMPLATE", "ADAPTER"])
def test_duplicate_template_or_adapter(directive: str) -> None:
    err = parse_error(f"FROM a\n{directive} x\n{directive} y\n")
    assert (err.line, err.directive) == (3, directive)


def test_line_numbers_continue_after_a_multi_line_string() -> None:
    err = parse_error('FROM a\nTEMPLATE """\n1\n2\n"""\nBOGUS x\n')
    assert (err.line, err.directive) == (6, "BOGUS")
