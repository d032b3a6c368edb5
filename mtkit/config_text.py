"""Reading a config's text for mtkit.config: `--set` overrides (one reading for every command)
merged into the YAML, the line of each dotted key, the one rule every number is held to whatever
its door (`Checked`), and validation errors turned into messages that name the key, its line (or
the override it came from) and the fix."""

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from mtkit.errors import MtkitError


def parse_override(item: str) -> tuple[str, object]:
    """`--set section.key=value` -> (the dotted key, the value read as YAML): the one reading of
    --set for every command."""
    key, eq, value = item.partition("=")
    key = key.strip()
    if not eq or not key or any(not part for part in key.split(".")):
        raise MtkitError(f"bad override {item!r}", hint="write --set section.key=value, e.g. --set train.lr=5e-4")
    try:
        return key, yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        return key, value  # not YAML: keep the literal string and let validation judge it


def apply_override(raw: dict, item: str) -> str:
    key, parsed = parse_override(item)
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise MtkitError(f"bad override {item!r}: {'.'.join(parents[: i + 1])} is not a section")
        node = child
    node[leaf] = parsed
    return key


def key_lines(node: yaml.Node | None, prefix: tuple = ()) -> dict[str, int]:
    """Map each dotted key in the YAML document to its 1-based line, for error messages."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (str(key_node.value),)
            key, line = ".".join(path), key_node.start_mark.line + 1
            if key in lines:  # YAML itself would keep the last one without a word
                raise MtkitError(f"line {line}: `{key}` is given twice (first on line {lines[key]})")
            lines[key] = line
            lines.update(key_lines(value_node, path))
    return lines


def all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        for ann in (field.annotation, *get_args(field.annotation)):  # a section, or a list of them (corpora)
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                keys.extend(all_keys(ann, prefix + name + "."))
    return keys


def config_error(path: Path, error: ValidationError, lines: dict[str, int], overrides: dict[str, str],
                 valid: list[str]) -> MtkitError:
    """valid: every dotted key of the config (all_keys(Config)), for naming keys and typos."""
    messages = []  # (line, text): shown in file order, --set overrides last
    for err in error.errors():
        # Tuple fields (betas, split pairs) put an element index into loc; the key is the field.
        key = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
        detail = err["msg"].removeprefix("Value error, ")
        if err["type"] == "value_error":
            # A cross-field rule is reported on its section; its message names the real key.
            key = _named_key(detail, key, valid) or key
            msg = detail
        elif err["type"] == "extra_forbidden":
            close = _closest_key(key, valid)
            msg = f"unknown key `{key}`" + (f": did you mean `{close}`?" if close else "")
        elif err["type"] == "missing":
            msg = f"`{key}` is required"
        elif err["type"] == "model_type":  # a section given as a value
            msg = f"`{key}` must be a section (its keys indented below it), not {err.get('input')!r}"
        else:
            msg = f"`{key}`: {detail} (got {err.get('input')!r})"
        line, where = _where(key, lines, overrides)
        messages.append((line, where + msg))
    messages = [text for _, text in sorted(messages, key=lambda m: m[0])]
    if len(messages) == 1:
        text = f"invalid config {path}: {messages[0]}"
    else:
        text = f"invalid config {path}:" + "".join(f"\n  {m}" for m in messages)
    return MtkitError(text, hint="configs/base.yaml documents every key and its allowed values")


def _named_key(message: str, section: str, valid: list[str]) -> str:
    return next((k for k in valid if k.startswith(section) and "." in k and k in message), "")


def _closest_key(key: str, valid: list[str]) -> str | None:
    """The valid key a typo most likely meant: the same name in another section (train.dropout ->
    model.dropout, not the near train.rdrop), else a near name in the same section, else a near
    name anywhere."""
    section, _, leaf = key.rpartition(".")
    same = [k for k in valid if k.rpartition(".")[2] == leaf]
    if same:
        return same[0]
    siblings = [k.rpartition(".")[2] for k in valid if k.rpartition(".")[0] == section]
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        return f"{section}.{close[0]}" if section else close[0]
    leaves = {k.rpartition(".")[2]: k for k in valid if "." in k}
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
    return leaves[close[0]] if close else None


def _where(key: str, lines: dict[str, int], overrides: dict[str, str]) -> tuple[int, str]:
    """The line a key is on (a missing key: its section's) and how to say where it came from."""
    if key in overrides:
        return 1 << 30, f"(from --set {overrides[key]}) "
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        line = lines.get(".".join(parts[:n]))
        if line:
            return line, f"line {line}: "
    return 0, ""


class Checked(BaseModel):
    """Values from any door (YAML, --set, a command-line option, an HTTP request, the Python API)
    are held to one rule: numbers finite (inf or NaN cut every translation to a word, or made every
    score -0.0), and true/false never taken for a number (pydantic would take it for 1)."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value, info):
        kinds = _kinds(cls.model_fields[info.field_name].annotation)
        if isinstance(value, bool) and bool not in kinds and {int, float} & kinds:
            raise ValueError(f"a number, not {str(value).lower()}")
        return value


def _kinds(annotation) -> set:
    """The plain types a field takes: int for Annotated[int, ...] | None."""
    if typing.get_origin(annotation) is Annotated:
        return _kinds(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return set().union(*map(_kinds, typing.get_args(annotation)))
    return {annotation}


def section_overrides(items: list[str] | None, command: str, sections: dict[str, type[BaseModel]]) -> dict:
    """--set section.key=value for a command that takes a trained model: only `sections` apply
    (decode for translate; decode and serve for serve) -> {section: {key: value}}, validated when
    merged over the model's own settings."""
    overrides = {name: {} for name in sections}
    for item in items or []:
        key, value = parse_override(item)
        section, _, name = key.partition(".")
        if name not in (sections[section].model_fields if section in sections else {}):
            keys = [f"{s}.{k}" for s, kind in sections.items() for k in kind.model_fields]
            raise MtkitError(f"{command} takes only {' and '.join(s + '.*' for s in sections)} overrides, not {key!r}",
                             hint=f"e.g. --set {keys[3]}=2; keys: " + ", ".join(keys))
        overrides[section][name] = value
    return overrides


def divisors_near(n: int, k: int) -> list[int]:
    """The divisors of n just below and just above k (a fix to suggest for model.heads)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return [d for d in divisors if d < k][-1:] + [d for d in divisors if d > k][:1]
