"""NATS-style subscription patterns: the matching matrix, compile errors, the regex form."""

import re

import pytest

from agentevents.core.errors import SubscribeError
from agentevents.core.patterns import Pattern, compile_pattern

# (pattern, event type, matches?)
MATRIX = [
    # literals
    ("code.build.failed", "code.build.failed", True),
    ("code.build.failed", "code.build", False),
    ("code.build.failed", "code.build.failed.again", False),
    ("code", "code", True),
    ("code", "codes", False),
    ("code_x", "code_x", True),
    # '*' is exactly one token
    ("*.failed", "task.failed", True),
    ("*.failed", "code.build.failed", False),
    ("*.failed", "failed", False),
    ("*.failed", "task.failed.again", False),
    ("code.*.failed", "code.build.failed", True),
    ("code.*.failed", "code.failed", False),
    ("code.*.failed", "code.a.b.failed", False),
    ("*", "code", True),
    ("*", "code.build", False),
    ("*.*", "code.build", True),
    ("*.*", "code", False),
    ("*.*", "a.b.c", False),
    ("code.*", "code.build", True),
    ("code.*", "code", False),
    ("code.*", "coder.build", False),
    # '>' is one or more trailing tokens
    ("code.>", "code.build.failed", True),
    ("code.>", "code.build", True),
    ("code.>", "code", False),
    ("code.>", "coder.build", False),
    ("code.>", "xcode.build", False),
    (">", "code", True),
    (">", "code.build.failed", True),
    ("*.>", "code.build", True),
    ("*.>", "code", False),
    ("*.build.>", "code.build.failed", True),
    ("*.build.>", "code.build", False),
    ("*.build.>", "code.test.failed", False),
    ("a.*.c.>", "a.b.c.d.e", True),
    ("a.*.c.>", "a.b.c", False),
    # tokens are whole words, never prefixes; '.' in a type is never a wildcard
    ("code.build", "code.builder", False),
    ("code.build", "codexbuild", False),
    ("v1.*", "v1.x_2", True),
]


@pytest.mark.parametrize(("pattern", "event_type", "expected"), MATRIX)
def test_matrix(pattern: str, event_type: str, expected: bool) -> None:
    assert compile_pattern(pattern).matches(event_type) is expected


@pytest.mark.parametrize(("pattern", "event_type", "expected"), MATRIX)
def test_regex_form_agrees_with_matches(pattern: str, event_type: str, expected: bool) -> None:
    regex = re.compile(compile_pattern(pattern).to_regex())
    assert (regex.match(event_type) is not None) is expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        ".",
        "code.",
        ".code",
        "code..build",
        "code.>.failed",
        ">.code",
        "Code.build",
        "code.Build",
        "code.bu-ild",
        "code.b*",
        "code.**",
        "code.>>",
        "code.bui>ld",
        "code build",
        "code.build ",
        "code/build",
    ],
)
def test_malformed_patterns_raise_subscribe_error(bad: str) -> None:
    with pytest.raises(SubscribeError, match="pattern"):
        compile_pattern(bad)


def test_is_literal() -> None:
    assert compile_pattern("code.build.failed").is_literal
    assert not compile_pattern("code.*").is_literal
    assert not compile_pattern("code.>").is_literal
    assert not compile_pattern(">").is_literal


def test_compiled_patterns_are_cached_and_compare_by_text() -> None:
    assert compile_pattern("a.*") is compile_pattern("a.*")
    assert Pattern("a.*") == compile_pattern("a.*")
    assert hash(Pattern("a.>")) == hash(compile_pattern("a.>"))
    assert Pattern("a.*") != Pattern("a.>")
    assert Pattern("a.*") != "a.*"
    assert compile_pattern("a.*").tokens == ("a", "*")
    assert repr(compile_pattern("a.*")) == "Pattern('a.*')"
