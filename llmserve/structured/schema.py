"""JSON Schema to GBNF, for ``response_format`` json_schema and for tool arguments.

llama-cpp-python's ``SchemaConverter`` writes the grammar, but it silently ignores keywords it does not
know and mishandles several it does: a type union drops every other keyword (``"type": ["object",
"null"]`` loses its properties), an enum under a type union is ignored, ``{}`` becomes "any object"
rather than any value, definitions whose names collide with other rules resolve to the wrong rule, and
strings may hold raw control characters. So every schema is first walked here: what the grammar cannot
enforce is refused with the path that holds it, and the rest is rewritten into the shapes the converter
handles correctly. The converter then runs unchanged except for a few overrides (JSON-safe string
characters, one rule per referenced definition, and integers and numbers within their bounds and
``multipleOf``, read by the automaton of ``numbers``).

Without ``strict`` (where OpenAI promises no adherence at all) what the grammar cannot enforce, such as
``uniqueItems``, a ``multipleOf`` too fine for it, or an unsupported ``format``, is dropped; with
``strict`` it is refused, so that a strict schema is either enforced exactly or not accepted.
Structural keywords the grammar cannot express (``not``, ``if``, ``patternProperties``, ...) are refused
either way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from llama_cpp.llama_grammar import PRIMITIVE_RULES, BuiltinRule, SchemaConverter

from llmserve.structured.numbers import Automaton, NoNumber, Numbers, TooComplex
from llmserve.structured.pattern import MAX_REPEAT, convert_pattern

# Keywords that describe a value without constraining it.
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$schema",
        "contentEncoding",
        "contentMediaType",
        "contentSchema",
    }
)
# The numeric keywords: enforced on integers and numbers by the automaton of ``numbers``.
NUMERIC = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
# Keywords the grammar enforces (some only in the combinations checked below).
SUPPORTED = frozenset(
    {
        "type",
        "enum",
        "const",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "pattern",
        "format",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "$defs",
        "definitions",
        *NUMERIC,
    }
)
# How a prepared schema hands that automaton to the converter.
NUMBERS = "llmserve-numbers"
# Bounds the grammar cannot enforce: dropped without strict, refused with it.
UNENFORCED = frozenset({"uniqueItems", "minProperties", "maxProperties"})
# The rest of JSON Schema (and two keywords of older drafts): refused. Other unknown keywords are
# annotations under JSON Schema's own rules and constrain nothing.
UNSUPPORTED = frozenset(
    {
        "not",
        "if",
        "then",
        "else",
        "dependentSchemas",
        "dependentRequired",
        "patternProperties",
        "propertyNames",
        "unevaluatedProperties",
        "unevaluatedItems",
        "contains",
        "minContains",
        "maxContains",
        "$id",
        "$anchor",
        "$dynamicRef",
        "$dynamicAnchor",
        "$vocabulary",
        "$recursiveRef",
        "$recursiveAnchor",
        "dependencies",
        "additionalItems",
    }
)
# String formats the converter has grammar rules for.
FORMATS = frozenset({"date", "time", "date-time", "uuid"})
JSON_TYPES = ("string", "number", "boolean", "object", "array", "null")
_TYPE_KEYWORDS = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "prefixItems", "minItems", "maxItems"},
    "string": {"pattern", "format", "minLength", "maxLength"},
}
_REF = re.compile(r"#/(\$defs|definitions)/([^/~%]+)")
_IDENTIFIER = re.compile(r"[A-Za-z_$][A-Za-z0-9_$-]*")

# The converter's string character allows raw control characters, which JSON forbids; this is
# llama.cpp's own JSON grammar's character.
SAFE_CHAR = BuiltinRule(
    r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])', []
)


class UnsupportedSchema(ValueError):
    """A schema that is invalid, or uses what the grammar cannot enforce; the message names where."""


def _member(key: str | int) -> str:
    if isinstance(key, int):
        return f"[{key}]"
    return f".{key}" if _IDENTIFIER.fullmatch(key) else f"[{json.dumps(key)}]"


def _path(keys: Iterable[str | int]) -> str:
    return "$" + "".join(_member(k) for k in keys)


def _any_value() -> dict[str, Any]:
    return {"type": list(JSON_TYPES)}


def _has_type(value: Any, json_type: str) -> bool:
    if json_type == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    if json_type == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    expected = {"string": str, "boolean": bool, "object": dict, "array": list}.get(json_type)
    return value is None if expected is None else isinstance(value, expected)


def _check_valid(schema: Any, path: str) -> None:
    if not isinstance(schema, Mapping | bool):
        raise UnsupportedSchema(f"{path}: not a valid JSON Schema: a schema must be an object or a boolean")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = path + "".join(_member(k) for k in exc.absolute_path)
        raise UnsupportedSchema(f"{where}: not a valid JSON Schema: {exc.message}") from None


@dataclass
class Prepared:
    """A schema rewritten for the converter, and the definitions its ``$ref`` keys point to."""

    schema: dict[str, Any]
    definitions: dict[str, dict[str, Any]] = field(default_factory=dict)


class _Walker:
    """One walk over a schema: refuses what the grammar cannot express and rewrites the rest."""

    def __init__(self, root: Mapping[str, Any], *, strict: bool, scope: str) -> None:
        self._root = root
        self._strict = strict
        self._scope = scope
        self._definitions: dict[str, dict[str, Any]] = {}
        self._paths: dict[str, str] = {}

    def run(self) -> Prepared:
        prepared = Prepared(self._walk(self._root, "$"), self._definitions)
        self._refuse_unguarded_cycles()
        return prepared

    def _unenforced(self, message: str) -> None:
        """Something the grammar cannot enforce: refused with strict, dropped (by the caller) without."""
        if self._strict:
            raise UnsupportedSchema(message)

    def _walk(self, schema: Any, path: str) -> dict[str, Any]:
        if schema is True:
            return _any_value()
        if schema is False:
            raise UnsupportedSchema(f"{path}: the schema false (no value at all) is not supported")
        keys = set(schema)
        if unsupported := sorted(keys & UNSUPPORTED):
            raise UnsupportedSchema(f"{path}: {unsupported[0]!r} is not supported")
        for keyword in sorted(keys & UNENFORCED):
            self._unenforced(f"{path}: {keyword!r} cannot be enforced by the grammar, so strict does not allow it")
        constraints = keys & SUPPORTED - {"$defs", "definitions"}
        for combinator in ("$ref", "allOf", "anyOf", "oneOf"):
            if combinator in keys and constraints - {combinator}:
                other = sorted(constraints - {combinator})[0]
                raise UnsupportedSchema(f"{path}: {combinator!r} alongside {other!r} is not supported")
        if "$ref" in keys:
            return {"$ref": self._reference(schema["$ref"], path)}
        if "allOf" in keys:
            if len(schema["allOf"]) != 1:
                raise UnsupportedSchema(f"{path}: 'allOf' is supported only with a single schema")
            return self._walk(schema["allOf"][0], f"{path}.allOf[0]")
        for union in ("anyOf", "oneOf"):
            if union in keys:
                if union == "oneOf":
                    self._unenforced(f"{path}: 'oneOf' cannot be enforced by the grammar (only 'anyOf' can)")
                return {"anyOf": [self._walk(s, f"{path}.{union}[{i}]") for i, s in enumerate(schema[union])]}
        declared = schema.get("type")
        types = [declared] if isinstance(declared, str) else declared
        if "enum" in keys or "const" in keys:
            return self._enum(schema, types, constraints, path)
        if types is None:
            types = [t for t, words in _TYPE_KEYWORDS.items() if keys & words] or list(JSON_TYPES)
        branches = [self._typed(schema, t, path) for t in types]
        return branches[0] if len(branches) == 1 else {"anyOf": branches}

    def _enum(
        self, schema: Mapping[str, Any], types: list[str] | None, constraints: set[str], path: str
    ) -> dict[str, Any]:
        extra = sorted(constraints - {"enum", "const", "type"} - NUMERIC)
        if extra or {"enum", "const"} <= constraints:
            raise UnsupportedSchema(f"{path}: {(extra or ['const'])[0]!r} alongside 'enum' is not supported")
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        if types is not None:
            values = [v for v in values if any(_has_type(v, t) for t in types)]
        if schema.keys() & NUMERIC:  # they constrain only the numbers among the values
            numbers = Numbers.from_schema(schema, integer=False)
            values = [v for v in values if not _has_type(v, "number") or numbers.contains(v)]
        if not values:
            raise UnsupportedSchema(f"{path}: no value of 'enum' or 'const' has the declared 'type'")
        return {"enum": values}

    def _typed(self, schema: Mapping[str, Any], json_type: str, path: str) -> dict[str, Any]:
        if json_type == "object":
            return self._object(schema, path)
        if json_type == "array":
            return self._array(schema, path)
        if json_type == "string":
            return self._string(schema, path)
        if json_type in ("integer", "number") and schema.keys() & NUMERIC:
            return self._numbers(schema, json_type, path)
        return {"type": json_type}

    def _numbers(self, schema: Mapping[str, Any], json_type: str, path: str) -> dict[str, Any]:
        numbers = Numbers.from_schema(schema, integer=json_type == "integer")
        try:
            automaton = numbers.automaton()
        except TooComplex as exc:
            self._unenforced(f"{path}: {exc}, so strict does not allow it")
            return {"type": json_type}
        except NoNumber:
            multiple = " and a multiple of 'multipleOf'" if numbers.step is not None else ""
            raise UnsupportedSchema(f"{path}: no {json_type} is within its bounds{multiple}") from None
        return {"type": json_type, NUMBERS: automaton}

    def _bounds(self, schema: Mapping[str, Any], low_key: str, high_key: str, path: str) -> dict[str, int]:
        low, high = schema.get(low_key, 0), schema.get(high_key)
        if high is not None and low > high:
            raise UnsupportedSchema(f"{path}: {low_key!r} is greater than {high_key!r}")
        if max(low, high or 0) > MAX_REPEAT:
            self._unenforced(f"{path}: {low_key!r} and {high_key!r} above {MAX_REPEAT} are not supported with strict")
            return {}
        bounds = {low_key: low} if low else {}
        return bounds if high is None else {**bounds, high_key: high}

    def _object(self, schema: Mapping[str, Any], path: str) -> dict[str, Any]:
        declared = schema.get("properties", {})
        required = list(schema.get("required", []))
        additional = schema.get("additionalProperties")
        for name in required:
            if name not in declared:
                raise UnsupportedSchema(f"{path}: 'required' lists {name!r}, which is not in 'properties'")
        if self._strict and additional is not False:
            raise UnsupportedSchema(f"{path}: strict requires 'additionalProperties': false on every object")
        if self._strict and len(required) != len(declared):
            missing = ", ".join(repr(name) for name in declared if name not in required)
            raise UnsupportedSchema(f"{path}: strict requires every property in 'required'; missing {missing}")
        if "properties" not in schema and additional is None:
            return {"type": "object"}
        properties = {name: self._walk(s, f"{path}.properties{_member(name)}") for name, s in declared.items()}
        result: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
        # Only declared properties are generated unless there are none: the converter's rule for extra
        # properties beside declared ones can drop a comma, and can repeat a declared name with a value of
        # the extra properties' schema. Generating fewer properties than allowed stays valid.
        if additional is not None and not declared:
            result["additionalProperties"] = additional is not False and self._walk(
                additional, f"{path}.additionalProperties"
            )
        return result

    def _array(self, schema: Mapping[str, Any], path: str) -> dict[str, Any]:
        prefix, items = schema.get("prefixItems"), schema.get("items")
        bounds = self._bounds(schema, "minItems", "maxItems", path)
        if prefix is not None or items is False:
            if items not in (None, False):
                raise UnsupportedSchema(f"{path}: 'prefixItems' is supported only with 'items': false or no 'items'")
            prefix = prefix or []
            if not bounds.get("minItems", 0) <= len(prefix) <= bounds.get("maxItems", len(prefix)):
                raise UnsupportedSchema(f"{path}: 'minItems' and 'maxItems' must allow exactly the 'prefixItems'")
            return {
                "type": "array",
                "prefixItems": [self._walk(s, f"{path}.prefixItems[{i}]") for i, s in enumerate(prefix)],
            }
        item = _any_value() if items in (None, True) else self._walk(items, f"{path}.items")
        return {"type": "array", "items": item, **bounds}

    def _string(self, schema: Mapping[str, Any], path: str) -> dict[str, Any]:
        string_format = schema.get("format")
        if string_format is not None and string_format not in FORMATS:
            self._unenforced(f"{path}: 'format' {string_format!r} is not supported with strict")
            string_format = None
        lengths = "minLength" in schema or "maxLength" in schema
        if "pattern" in schema:
            if string_format or lengths:
                self._unenforced(
                    f"{path}: 'pattern' with 'format', 'minLength' or 'maxLength' is not supported with strict"
                )
            try:
                return {"type": "string", "pattern": convert_pattern(schema["pattern"])}
            except ValueError as exc:
                self._unenforced(f"{path}: 'pattern' {exc}")
                return {"type": "string"}
        if string_format:
            if lengths:
                self._unenforced(f"{path}: 'format' with 'minLength' or 'maxLength' is not supported with strict")
            return {"type": "string", "format": string_format}
        return {"type": "string", **self._bounds(schema, "minLength", "maxLength", path)}

    def _reference(self, ref: str, path: str) -> str:
        match = _REF.fullmatch(ref)
        if not match:
            raise UnsupportedSchema(
                f"{path}: '$ref' {ref!r} is not supported; use '#/$defs/NAME' or '#/definitions/NAME'"
            )
        container = self._root.get(match[1])
        if not isinstance(container, Mapping) or match[2] not in container:
            raise UnsupportedSchema(f"{path}: '$ref' {ref!r} points to no definition")
        key = self._scope + ref
        if key not in self._definitions:
            self._paths[key] = _path(match.groups())
            _check_valid(container[match[2]], self._paths[key])  # 'definitions' is not a 2020-12 keyword
            self._definitions[key] = {}  # a recursive reference stops here
            self._definitions[key] = self._walk(container[match[2]], self._paths[key])
        return key

    def _refuse_unguarded_cycles(self) -> None:
        """Refuse definitions that reach themselves before any bracket: llama.cpp refuses left recursion."""

        def heads(node: Mapping[str, Any]) -> set[str]:
            if "$ref" in node:
                return {node["$ref"]}
            return set().union(*(heads(a) for a in node.get("anyOf", [])))

        for start in self._definitions:
            seen: set[str] = set()
            todo = heads(self._definitions[start])
            while todo:
                key = todo.pop()
                if key == start:
                    raise UnsupportedSchema(
                        f"{self._paths[start]}: a '$ref' cycle that passes through no object or array is not supported"
                    )
                if key not in seen:
                    seen.add(key)
                    todo |= heads(self._definitions[key])


def prepare(schema: Mapping[str, Any], *, strict: bool, scope: str = "") -> Prepared:
    """Check ``schema`` and rewrite it for the converter; ``scope`` keeps apart the definitions of several."""
    if not isinstance(schema, Mapping):
        raise UnsupportedSchema("$: a schema must be a JSON object")
    _check_valid(schema, "$")
    if strict and schema.get("type") != "object":
        raise UnsupportedSchema("$: strict requires the root to be an object ('type': 'object')")
    return _Walker(schema, strict=strict, scope=scope).run()


def check_schema(schema: Mapping[str, Any], *, strict: bool) -> None:
    """Raise UnsupportedSchema unless ``schema`` is valid and its grammar enforces it (OpenAI's rules if strict)."""
    prepare(schema, strict=strict)


class GrammarBuilder(SchemaConverter):
    """llama-cpp-python's converter, with JSON-safe strings, a rule per referenced definition and integer ranges."""

    def __init__(self) -> None:
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        self._ref_rules: dict[str, str] = {}

    def add_schema(self, prepared: Prepared, name: str) -> str:
        """Add the rules for a prepared schema; return the name of its rule (``root`` for the name "")."""
        self._refs.update(prepared.definitions)
        return str(self.visit(prepared.schema, name))

    def rule(self, name: str, body: str) -> str:
        """Add a rule; return its name, suffixed if another rule already took ``name``."""
        return str(self._add_rule(name, body))

    def reserve(self, name: str) -> str:
        """A free rule name for a rule whose body is set later with ``define`` (for recursion)."""
        return self.rule(name, f"<reserved {len(self._rules)}>")

    def define(self, name: str, body: str) -> None:
        self._rules[name] = body

    def literal(self, text: str) -> str:
        return str(self._format_literal(text))

    def text(self) -> str:
        return str(self.format_grammar()) + "\n"

    def visit(self, schema: Mapping[str, Any], name: str) -> str:
        if NUMBERS in schema:
            automaton: Automaton = schema[NUMBERS]
            top = self.reserve(name or "root")
            names = [self.reserve(f"{top}-{i}") for i in range(len(automaton))]
            for rule_name, body in zip(names, automaton.bodies(names), strict=True):
                self.define(rule_name, body)
            self.define(top, f"{names[0]} space")
            return top
        return str(super().visit(schema, name))

    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        return str(super()._add_primitive(name, SAFE_CHAR if rule is PRIMITIVE_RULES["char"] else rule))

    def _resolve_ref(self, ref: str) -> str:
        # The converter names a definition's rule after its last path segment, so a definition named like
        # another rule ("string", a property) resolves to that rule. Reserve a fresh name first instead.
        if ref not in self._ref_rules:
            self._ref_rules[ref] = self.reserve(f"ref-{ref.rsplit('/', 1)[-1]}")
            self.define(self._ref_rules[ref], self.visit(self._refs[ref], f"{self._ref_rules[ref]}-value"))
        return self._ref_rules[ref]


def schema_grammar(schema: Mapping[str, Any]) -> str:
    """GBNF (root rule ``root``) for one JSON value valid against ``schema``, with at most one space between tokens."""
    builder = GrammarBuilder()
    builder.add_schema(prepare(schema, strict=False), "")
    return builder.text()


# response_format {"type": "json_object"}: any JSON object.
JSON_OBJECT_GRAMMAR = schema_grammar({"type": "object"})
