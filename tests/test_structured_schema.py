"""JSON Schema grammars: llama.cpp accepts them, and they generate only JSON the schema accepts.

Soundness is checked by sampling: every text the grammar can generate must parse as JSON and validate
against the schema. Coverage by matching valid instances (as ``json.dumps`` writes them: constants and
enum values come out in exactly that form) and refusing invalid ones.
"""

from __future__ import annotations

import json
import random
from decimal import Decimal
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from llmserve.structured import JSON_OBJECT_GRAMMAR, UnsupportedSchema, check_schema, schema_grammar
from llmserve.structured.numbers import Numbers
from tests.test_structured_gbnf import Grammar, llama_accepts

ADDRESS = {
    "type": "object",
    "properties": {"street": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
    "required": ["street", "zip"],
    "additionalProperties": False,
}
TREE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
            },
            "required": ["name", "children"],
            "additionalProperties": False,
        }
    },
    "$ref": "#/$defs/node",
}

# (schema, valid instances, invalid instances)
CASES: list[tuple[dict[str, Any], list[Any], list[Any]]] = [
    (
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "a city"},
                "days": {"type": "integer"},
                "celsius": {"type": "boolean"},
                "ratio": {"type": "number"},
            },
            "required": ["city"],
        },
        [{"city": "Paris"}, {"city": 'Köln "x" \\n', "days": -3, "ratio": 1.5e3}, {"city": "", "celsius": True}],
        [{}, {"city": 3}, {"city": "Paris", "days": 1.5}, {"city": "Paris", "other": 1}, ["Paris"]],
    ),
    (ADDRESS, [{"street": "Main St", "zip": "12345"}], [{"street": "Main St", "zip": "1234"}, {"zip": "12345"}]),
    (
        {"type": "object", "properties": {"home": {"anyOf": [ADDRESS, {"type": "null"}]}}, "required": ["home"]},
        [{"home": None}, {"home": {"street": "a", "zip": "00000"}}],
        [{"home": "a"}, {}],
    ),
    (
        {"type": ["object", "null"], "properties": {"n": {"type": "integer"}}, "required": ["n"]},
        [None, {"n": 1}],
        [{"n": "1"}, {}, 3],
    ),
    (
        {"type": ["string", "null"], "enum": ["red", "green", None, 7]},
        ["red", "green", None],
        ["blue", 7, "Red"],
    ),
    ({"const": {"a": [1, "x"]}}, [{"a": [1, "x"]}], [{"a": [1]}, None]),
    (
        {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 3}, "minItems": 1, "maxItems": 3},
        [["a"], ["abc", "b", "c"]],
        [[], ["abcd"], [""], ["a", "b", "c", "d"], [1]],
    ),
    (
        {"type": "array", "prefixItems": [{"type": "integer"}, {"enum": ["x", "y"]}], "items": False},
        [[1, "x"], [-20, "y"]],
        [[1], [1, "z"], [1, "x", 2]],
    ),
    (
        TREE,
        [{"name": "a", "children": [{"name": "b", "children": []}]}],
        [{"name": "a"}, {"name": "a", "children": [1]}],
    ),
    (
        {
            "definitions": {"id": {"type": "string", "format": "uuid"}},
            "type": "array",
            "items": {"$ref": "#/definitions/id"},
        },
        [["123e4567-e89b-12d3-a456-426614174000"]],
        [["123e4567"], [1]],
    ),
    (
        {"type": "object", "properties": {"on": {"type": "string", "format": "date"}, "at": {"format": "date-time"}}},
        [{"on": "2024-05-01", "at": "2024-05-01T10:00:00Z"}, {"at": "2024-05-01T10:00:00.123+02:00"}],
        [{"on": "May 1"}, {"at": "2024-05-01"}],
    ),
    (
        {"type": "object", "additionalProperties": {"type": "integer"}},
        [{}, {"a": 1, "b": 2}],
        [{"a": "1"}],
    ),
    (
        {
            "type": "object",
            "properties": {"x": {}, "n": {"type": "integer"}},
            "additionalProperties": {"type": "string"},
        },
        [{"x": [None, {}]}, {"x": "z", "n": 1}, {}],
        [{"x": 1, "y": "z"}, {"n": "z"}],
    ),
    ({}, [1, "a", None, [True], {"k": {}}], []),
    ({"type": "string", "pattern": "^(ab|c)+[.]?$"}, ["ab", "cab.", "c"], ["", "a", "abab.."]),
    (
        {
            "anyOf": [{"type": "integer"}, {"type": "array", "items": {"$ref": "#/$defs/string"}}],
            "$defs": {"string": {"type": "boolean"}},
        },
        [3, [True]],
        [["s"], "s"],
    ),
]


def _shapes(value: Any) -> list[str]:
    return [json.dumps(value), json.dumps(value, ensure_ascii=False)]


@pytest.mark.parametrize(("schema", "valid", "invalid"), CASES)
def test_grammars_are_accepted_by_llama_cpp(schema: dict[str, Any], valid: list[Any], invalid: list[Any]) -> None:
    assert llama_accepts(schema_grammar(schema))


@pytest.mark.parametrize(("schema", "valid", "invalid"), CASES)
def test_valid_instances_match_and_invalid_ones_do_not(
    schema: dict[str, Any], valid: list[Any], invalid: list[Any]
) -> None:
    grammar = Grammar(schema_grammar(schema))
    validator = Draft202012Validator(schema)
    for value in valid:
        assert validator.is_valid(value), value
        for text in _shapes(value):
            assert grammar.matches(text), text
    for value in invalid:  # invalid, or (an undeclared property) valid but never generated
        assert not any(grammar.matches(text) for text in _shapes(value)), value


@pytest.mark.parametrize(("schema", "valid", "invalid"), CASES)
def test_everything_the_grammar_generates_is_valid(
    schema: dict[str, Any], valid: list[Any], invalid: list[Any]
) -> None:
    grammar = Grammar(schema_grammar(schema))
    validator = Draft202012Validator(schema)
    rng = random.Random(1)
    for _ in range(150):
        text = grammar.sample(rng)
        validator.validate(json.loads(text))


def test_whitespace_is_bounded_to_one_space() -> None:
    grammar = Grammar(schema_grammar({"type": "object", "properties": {"a": {"type": "integer"}}}))
    assert grammar.matches('{ "a" : 1 } ')
    assert not grammar.matches('{"a":  1}')
    assert not grammar.matches('{\n"a": 1}')
    assert not grammar.matches(' {"a": 1}')


def test_json_object_mode_allows_any_object_and_only_json_strings() -> None:
    assert llama_accepts(JSON_OBJECT_GRAMMAR)
    grammar = Grammar(JSON_OBJECT_GRAMMAR)
    assert grammar.matches('{"a": [1, {"b": null}], "c": "\\u00e9\\n"}')
    assert grammar.matches("{}")
    assert not grammar.matches("[]")
    assert not grammar.matches('"a"')
    assert not grammar.matches('{"a": "line\nbreak"}')  # a raw control character is not JSON


def test_long_bounds_stay_within_what_llama_cpp_accepts() -> None:
    assert llama_accepts(schema_grammar({"type": "string", "maxLength": 1000}))
    with pytest.raises(UnsupportedSchema, match=r"^\$\.properties\.s: 'minLength' and 'maxLength' above 1000"):
        check_schema(
            {
                "type": "object",
                "properties": {"s": {"type": "string", "maxLength": 5000}},
                "required": ["s"],
                "additionalProperties": False,
            },
            strict=True,
        )
    relaxed = schema_grammar({"type": "array", "maxItems": 5000})
    assert llama_accepts(relaxed)
    assert Grammar(relaxed).matches(json.dumps(list(range(1200))))


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "object", "patternProperties": {"^a": {}}}, r"^\$: 'patternProperties' is not supported$"),
        ({"properties": {"x": {"not": {"type": "null"}}}}, r"^\$\.properties\.x: 'not' is not supported$"),
        ({"if": {}, "then": {}, "else": {}}, r"^\$: 'else' is not supported$"),
        ({"properties": {"x": {"dependentSchemas": {"a": {}}}}}, r"^\$\.properties\.x: 'dependentSchemas'"),
        ({"type": "object", "unevaluatedProperties": False}, r"^\$: 'unevaluatedProperties' is not supported$"),
        ({"type": "array", "items": {"contains": {}}}, r"^\$\.items: 'contains' is not supported$"),
        ({"properties": {"a b": {"propertyNames": {}}}}, r'^\$\.properties\["a b"\]: \'propertyNames\''),
        ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, r"^\$: 'allOf' is supported only with a single schema$"),
        ({"anyOf": [{"type": "string"}], "type": "string"}, r"^\$: 'anyOf' alongside 'type' is not supported$"),
        ({"$ref": "#/$defs/a", "type": "string", "$defs": {"a": {}}}, r"^\$: '\$ref' alongside 'type'"),
        ({"$ref": "https://example.com/schema"}, r"^\$: '\$ref' 'https://example.com/schema' is not supported"),
        ({"$ref": "#"}, r"^\$: '\$ref' '#' is not supported"),
        ({"$ref": "#/$defs/missing"}, r"points to no definition$"),
        (
            {"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/b"}]}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
            r"cycle",
        ),
        ({"type": "object", "properties": {"x": False}}, r"^\$\.properties\.x: the schema false"),
        ({"type": "object", "required": ["x"]}, r"^\$: 'required' lists 'x', which is not in 'properties'$"),
        ({"type": "string", "enum": ["a"], "maxLength": 3}, r"^\$: 'maxLength' alongside 'enum' is not supported$"),
        ({"type": "integer", "enum": ["a"]}, r"no value of 'enum'"),
        ({"prefixItems": [{}], "items": {"type": "string"}}, r"'prefixItems' is supported only with 'items': false"),
        ({"type": "objekt"}, r"^\$\.type: not a valid JSON Schema"),
        ({"properties": {"x": {"minLength": -1}}}, r"^\$\.properties\.x\.minLength: not a valid JSON Schema"),
        ({"definitions": {"x": {"type": 3}}, "$ref": "#/definitions/x"}, r"^\$\.definitions\.x\.type: not a valid"),
        ({"type": "string", "maxLength": 2, "minLength": 3}, r"'minLength' is greater than 'maxLength'"),
    ],
)
def test_unsupported_constructs_are_refused_by_name(schema: dict[str, Any], message: str) -> None:
    with pytest.raises(UnsupportedSchema, match=message):
        check_schema(schema, strict=False)
    with pytest.raises(UnsupportedSchema):  # with strict, a root that is not an object may be named first
        check_schema(schema, strict=True)
    with pytest.raises(UnsupportedSchema, match=message):
        schema_grammar(schema)


def _strict_object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "array"}, r"^\$: strict requires the root to be an object"),
        ({"type": "object", "properties": {}}, r"^\$: strict requires 'additionalProperties': false on every object$"),
        (
            _strict_object(
                {"home": {"type": "object", "properties": {"zip": {"type": "string"}}, "additionalProperties": False}}
            ),
            r"^\$\.properties\.home: strict requires every property in 'required'; missing 'zip'$",
        ),
        (
            _strict_object({"list": {"type": "array", "items": {"type": "object", "properties": {}}}}),
            r"^\$\.properties\.list\.items: strict requires 'additionalProperties': false",
        ),
        (
            _strict_object({"price": {"type": "number", "multipleOf": 0.1234}}),
            r"^\$\.properties\.price: 'multipleOf' 0.1234 needs 1234 remainders; .* so strict does not allow it$",
        ),
        (
            _strict_object({"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}),
            r"^\$\.properties\.tags: 'uniqueItems' cannot be enforced",
        ),
        (_strict_object({"mail": {"type": "string", "format": "email"}}), r"^\$\.properties\.mail: 'format' 'email'"),
        (_strict_object({"x": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}), r"^\$\.properties\.x: 'oneOf'"),
        (_strict_object({"s": {"type": "string", "pattern": "^\\s+$"}}), r"^\$\.properties\.s: 'pattern' uses '\\s'"),
        (_strict_object({"s": {"type": "string", "pattern": "abc"}}), r"'pattern' must be anchored"),
        (_strict_object({"s": {"type": "string", "pattern": "^a$", "maxLength": 3}}), r"'pattern' with 'format'"),
    ],
)
def test_strict_mode_follows_openai_rules(schema: dict[str, Any], message: str) -> None:
    with pytest.raises(UnsupportedSchema, match=message):
        check_schema(schema, strict=True)
    check_schema(schema, strict=False)
    assert llama_accepts(schema_grammar(schema))


def test_a_strict_schema_that_follows_the_rules_passes() -> None:
    schema = _strict_object(
        {
            "name": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 2},
            "home": {"anyOf": [ADDRESS, {"type": "null"}]},
            "when": {"type": ["string", "null"], "format": "date"},
        }
    )
    check_schema(schema, strict=True)


def test_unenforced_bounds_are_dropped_without_strict() -> None:
    grammar = Grammar(
        schema_grammar({"type": "object", "properties": {"price": {"type": "number", "multipleOf": 0.1234}}})
    )
    assert grammar.matches('{"price": 3.5}')


@pytest.mark.parametrize("strict", [True, False])
def test_integer_bounds_are_enforced_by_the_grammar(strict: bool) -> None:
    """minimum, maximum and their exclusive forms on an integer, as OpenAI's strict mode supports them."""
    schema = _strict_object(
        {
            "age": {"type": "integer", "minimum": 18, "exclusiveMaximum": 130},
            "delta": {"type": "integer", "exclusiveMinimum": -10.5, "maximum": 7},
        }
    )
    check_schema(schema, strict=strict)
    grammar = Grammar(schema_grammar(schema))
    validator = Draft202012Validator(schema)
    for age in (-1, 0, 17, 18, 19, 99, 100, 129, 130, 1000):
        for delta in (-11, -10, -1, 0, 7, 8, 70):
            text = json.dumps({"age": age, "delta": delta})
            assert grammar.matches(text) == validator.is_valid(json.loads(text)), text


@pytest.mark.parametrize("strict", [True, False])
def test_integer_bounds_of_a_number_are_enforced_by_the_grammar(strict: bool) -> None:
    """A score from 0 to 1, a positive amount, a temperature below zero: bounds that are integers."""
    schema = _strict_object(
        {
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "amount": {"type": "number", "exclusiveMinimum": 0},
            "celsius": {"type": "number", "minimum": -40, "exclusiveMaximum": 0},
        }
    )
    check_schema(schema, strict=strict)
    grammar = Grammar(schema_grammar(schema))
    validator = Draft202012Validator(schema)
    valid = {"score": "0.5", "amount": "3", "celsius": "-1.5"}
    # Numbers as the grammar writes them: no exponent, no trailing zeros (fewer forms than JSON allows).
    for name in valid:
        for value in ("0", "1", "0.5", "0.999", "1.5", "-0.5", "-1", "2", "40.25", "-40", "-40.5", "-39.75", "-0.001"):
            text = "{" + ", ".join(f'"{key}": {value if key == name else valid[key]}' for key in valid) + "}"
            assert grammar.matches(text) == validator.is_valid(json.loads(text)), text


@pytest.mark.parametrize("divisor", [1, 2, 3, 7, 10, 25, 120, 1000])
def test_an_integer_multiple_of_is_enforced_by_the_grammar(divisor: int) -> None:
    schema = {"type": "integer", "multipleOf": divisor}
    check_schema(_strict_object({"n": schema}), strict=True)
    rule = schema_grammar(schema)
    assert llama_accepts(rule)
    grammar = Grammar(rule)
    values = list(range(-60, 61)) + random.Random(divisor).sample(range(-(10**12), 10**12), 200)
    for value in [*values, divisor * 123_456_789, -divisor * 31]:
        assert grammar.matches(str(value)) == (value % divisor == 0), value
    for text in ("-0", "00", "05", "+5", "5.0"):
        assert not grammar.matches(text), text


@pytest.mark.parametrize("strict", [True, False])
def test_bounds_and_multiples_of_a_number_are_enforced_by_the_grammar(strict: bool) -> None:
    """A price from 0.5 in cents, a share below 99.99, an even count of at least 2, an optional rating."""
    schema = _strict_object(
        {
            "price": {"type": "number", "minimum": 0.5, "multipleOf": 0.01},
            "share": {"type": "number", "exclusiveMaximum": 99.99},
            "pairs": {"type": "integer", "minimum": 2, "multipleOf": 2},
            "rating": {"type": ["number", "null"], "minimum": 0.5, "maximum": 5, "multipleOf": 0.5},
        }
    )
    check_schema(schema, strict=strict)
    grammar = Grammar(schema_grammar(schema))
    fields = {
        name: Numbers.from_schema(field, integer=field["type"] == "integer")
        for name, field in schema["properties"].items()
    }
    valid = {"price": "0.5", "share": "1", "pairs": "2", "rating": "null"}
    for name in valid:
        for value in (
            "0",
            "0.5",
            "0.49",
            "0.51",
            "0.505",
            "2",
            "3",
            "-2",
            "4.5",
            "5",
            "5.5",
            "99.98",
            "99.99",
            "100",
            "null",
        ):
            text = "{" + ", ".join(f'"{key}": {value if key == name else valid[key]}' for key in valid) + "}"
            allowed = (value == "null" and name == "rating") or (
                value != "null" and fields[name].contains(Decimal(value))
            )
            assert grammar.matches(text) == allowed, text


def test_numeric_keywords_filter_an_enum() -> None:
    grammar = Grammar(schema_grammar({"enum": [1, 2.5, 4, "four"], "minimum": 2, "multipleOf": 0.5}))
    assert [v for v in ("1", "2.5", "4", '"four"') if grammar.matches(v)] == ["2.5", "4", '"four"']


def test_an_integer_multiple_of_within_bounds() -> None:
    schema = _strict_object({"n": {"type": "integer", "multipleOf": 15, "minimum": -31, "exclusiveMaximum": 60}})
    check_schema(schema, strict=True)
    grammar = Grammar(schema_grammar(schema))
    assert [n for n in range(-100, 100) if grammar.matches(f'{{"n": {n}}}')] == [-30, -15, 0, 15, 30, 45]
    with pytest.raises(UnsupportedSchema, match="no integer is within its bounds and a multiple of 'multipleOf'"):
        check_schema(
            _strict_object({"n": {"type": "integer", "multipleOf": 10, "minimum": 1, "maximum": 9}}), strict=True
        )


def test_bounds_no_integer_meets_are_refused() -> None:
    with pytest.raises(UnsupportedSchema, match="no integer is within its bounds"):
        check_schema(_strict_object({"n": {"type": "integer", "minimum": 3.5, "maximum": 3.9}}), strict=True)
    with pytest.raises(UnsupportedSchema, match="no number is within its bounds"):
        check_schema(_strict_object({"x": {"type": "number", "minimum": 3, "exclusiveMaximum": 3}}), strict=True)


def test_definition_names_never_capture_other_rules() -> None:
    # The converter alone would resolve these references to its own "string" and "space" rules.
    schema = {
        "type": "object",
        "properties": {"space": {"$ref": "#/$defs/space"}, "s": {"$ref": "#/$defs/string"}},
        "required": ["space", "s"],
        "$defs": {"space": {"type": "integer"}, "string": {"enum": [1, 2]}},
    }
    grammar = Grammar(schema_grammar(schema))
    assert grammar.matches('{"space": 5, "s": 2}')
    assert not grammar.matches('{"space": " ", "s": "x"}')
