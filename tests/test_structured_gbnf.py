"""A small GBNF reader for the structured-output tests, and checks that it reads GBNF as llama.cpp does.

Without a model, llama.cpp can still parse a grammar (``llama_sampler_init_grammar`` with no vocabulary
parses it, checks rule references and left recursion, and returns NULL on any error), but it cannot
match text against it: matching needs a vocabulary. So the tests match and sample with this reader,
which covers the GBNF the converter and the tool grammar write (literals, classes, groups, ``* + ?``,
``{m,n}``), and use llama.cpp as the judge of whether a grammar is accepted at all.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from functools import cache

import llama_cpp as lc
import pytest

_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "[": "[", "]": "]"}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}
# Characters the sampler tries for negated classes: the ones JSON and grammars get wrong first.
_PROBES = [*'az AZ09"\\\n\t\x00\x7f/<>{}[]:,é€😀\u2028', "_", "-", "."]


def llama_accepts(grammar: str) -> bool:
    """Whether llama.cpp's own parser accepts ``grammar`` (with root rule ``root``); needs no model."""
    sampler = lc.llama_sampler_init_grammar(None, grammar.encode(), b"root")
    if not sampler:
        return False
    lc.llama_sampler_free(sampler)
    return True


@dataclass(frozen=True)
class Node:
    kind: str  # lit, cls, any, ref, seq, alt, rep
    text: str = ""
    negated: bool = False
    ranges: tuple[tuple[int, int], ...] = ()
    items: tuple[Node, ...] = ()
    low: int = 0
    high: int | None = None


class _Reader:
    def __init__(self, body: str) -> None:
        self.body = body
        self.i = 0

    def peek(self) -> str:
        while self.i < len(self.body) and self.body[self.i] in " \t":
            self.i += 1
        return self.body[self.i] if self.i < len(self.body) else ""

    def char(self) -> str:
        c = self.body[self.i]
        self.i += 1
        if c != "\\":
            return c
        kind = self.body[self.i]
        self.i += 1
        if kind in _HEX_DIGITS:
            digits = self.body[self.i : self.i + _HEX_DIGITS[kind]]
            self.i += len(digits)
            return chr(int(digits, 16))
        return _ESCAPES[kind]

    def alternatives(self) -> Node:
        options = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else Node("alt", items=tuple(options))

    def sequence(self) -> Node:
        items = []
        while self.peek() not in ("", "|", ")"):
            items.append(self.postfix(self.primary()))
        return Node("seq", items=tuple(items))

    def primary(self) -> Node:
        c = self.peek()
        if c == '"':
            self.i += 1
            text = ""
            while self.body[self.i] != '"':
                text += self.char()
            self.i += 1
            return Node("lit", text=text)
        if c == "[":
            self.i += 1
            negated = self.body[self.i] == "^"
            self.i += negated
            ranges = []
            while self.body[self.i] != "]":
                low = ord(self.char())
                high = low
                if self.body[self.i] == "-" and self.body[self.i + 1] != "]":
                    self.i += 1
                    high = ord(self.char())
                ranges.append((low, high))
            self.i += 1
            return Node("cls", negated=negated, ranges=tuple(ranges))
        if c == "(":
            self.i += 1
            inner = self.alternatives()
            assert self.peek() == ")", self.body[self.i :]
            self.i += 1
            return inner
        if c == ".":
            self.i += 1
            return Node("any")
        start = self.i
        while self.i < len(self.body) and (self.body[self.i].isalnum() or self.body[self.i] == "-"):
            self.i += 1
        assert self.i > start, f"unexpected {self.body[self.i :]!r}"
        return Node("ref", text=self.body[start : self.i])

    def postfix(self, node: Node) -> Node:
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                self.i += 1
                node = Node("rep", items=(node,), low=int(c == "+"), high=1 if c == "?" else None)
            elif c == "{":
                end = self.body.index("}", self.i)
                low, _, high = self.body[self.i + 1 : end].partition(",")
                bounded = int(high) if high else (None if "," in self.body[self.i : end] else int(low))
                node = Node("rep", items=(node,), low=int(low or 0), high=bounded)
                self.i = end + 1
            else:
                return node


class Grammar:
    """A GBNF grammar, one rule per line, that can match and generate text."""

    def __init__(self, text: str) -> None:
        self.rules: dict[str, Node] = {}
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                name, _, body = line.partition("::=")
                reader = _Reader(body)
                self.rules[name.strip()] = reader.alternatives()
                assert reader.peek() == "", f"trailing text in rule {name}: {body[reader.i :]!r}"

    def matches(self, text: str) -> bool:
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 20 * len(text) + 1000))

        @cache
        def rule_ends(name: str, position: int) -> frozenset[int]:
            return ends(self.rules[name], position)

        def ends(node: Node, position: int) -> frozenset[int]:
            if node.kind == "lit":
                return frozenset({position + len(node.text)}) if text.startswith(node.text, position) else frozenset()
            if node.kind in ("cls", "any"):
                if position >= len(text):
                    return frozenset()
                inside = any(lo <= ord(text[position]) <= hi for lo, hi in node.ranges)
                return frozenset({position + 1}) if node.kind == "any" or inside != node.negated else frozenset()
            if node.kind == "ref":
                return rule_ends(node.text, position)
            if node.kind == "alt":
                return frozenset().union(*(ends(item, position) for item in node.items))
            if node.kind == "seq":
                positions = frozenset({position})
                for item in node.items:
                    positions = frozenset().union(*(ends(item, p) for p in positions))
                return positions
            found = set() if node.low else {position}
            current, seen, count = {position}, {position}, 0
            while current and (node.high is None or count < node.high):
                current = set().union(*(ends(node.items[0], p) for p in current))
                count += 1
                if node.high is None and count >= node.low:
                    current -= seen
                    seen |= current
                if count >= node.low:
                    found |= current
            return frozenset(found)

        return len(text) in rule_ends("root", 0)

    def sample(self, rng: random.Random, *, max_depth: int = 40) -> str:
        """A random text the grammar generates (retrying derivations that nest deeper than ``max_depth``)."""
        for _ in range(200):
            out: list[str] = []
            try:
                self._generate(Node("ref", text="root"), rng, out, max_depth)
            except RecursionError:
                continue
            return "".join(out)
        raise AssertionError("every derivation nested too deep")

    def _generate(self, node: Node, rng: random.Random, out: list[str], depth: int) -> None:
        if node.kind == "lit":
            out.append(node.text)
        elif node.kind == "any":
            out.append(rng.choice(_PROBES))
        elif node.kind == "cls" and node.negated:
            allowed = [c for c in _PROBES if not any(lo <= ord(c) <= hi for lo, hi in node.ranges)]
            out.append(rng.choice(allowed))
        elif node.kind == "cls":
            low, high = rng.choice(node.ranges)
            out.append(chr(rng.randint(low, min(high, low + 200))))
        elif node.kind == "ref":
            if depth == 0:
                raise RecursionError
            self._generate(self.rules[node.text], rng, out, depth - 1)
        elif node.kind == "alt":
            self._generate(rng.choice(node.items), rng, out, depth)
        elif node.kind == "seq":
            for item in node.items:
                self._generate(item, rng, out, depth)
        else:
            count = node.low
            while (node.high is None or count < node.high) and rng.random() < 0.6:
                count += 1
            for _ in range(count):
                self._generate(node.items[0], rng, out, depth)


def test_llama_cpp_parses_grammars_without_a_model() -> None:
    assert llama_accepts('root ::= "a" [^"\\\\\\x00-\\x1F]* x?\nx ::= "b"{1,3}\n')
    assert not llama_accepts('root ::= "a" (')
    assert not llama_accepts("root ::= undefined-rule")
    assert not llama_accepts('other ::= "a"')  # no root
    assert not llama_accepts('root ::= root "a" | "b"')  # left recursion
    assert not llama_accepts('root ::= "\\."')  # an escape GBNF does not have


def test_the_reader_matches_as_gbnf_does() -> None:
    grammar = Grammar('root ::= "a" [^bc\\x22]* ("c" | d){2,3} "e"?\nd ::= [0-9]+\n')
    assert grammar.matches("axxcc")
    assert grammar.matches("ac12ce")
    assert not grammar.matches("abcc")
    assert not grammar.matches('a"cc')
    assert not grammar.matches("acccc")
    assert not grammar.matches("ac")


def test_samples_are_always_matched() -> None:
    grammar = Grammar('root ::= "[" (item ("," " "? item)*)? "]"\nitem ::= [a-c]{1,2} | "<" [^<>] ">" | root\n')
    rng = random.Random(7)
    for _ in range(200):
        text = grammar.sample(rng)
        assert grammar.matches(text), text


@pytest.mark.parametrize("text", ["", "[", "[a,]", "[<<>]", "[abc]"])
def test_non_members_are_refused(text: str) -> None:
    grammar = Grammar('root ::= "[" (item ("," " "? item)*)? "]"\nitem ::= [a-c]{1,2} | "<" [^<>] ">" | root\n')
    assert not grammar.matches(text)
