"""YAML with line numbers: policy files (BPF policies, tenant network policies) are written by
hand, and a refusal names the file, the line and what would be accepted."""

from __future__ import annotations

from .errors import SpecError


class YamlDoc:
    """A YAML document whose every refusal names its file and line (SpecError where)."""

    def __init__(self, text: str, source: str) -> None:
        import yaml  # lazy: a cached compiled policy needs no YAML at all

        self.yaml = yaml
        self.source = source
        self.loader = yaml.SafeLoader(text)
        try:
            self.root = self.loader.get_single_node()
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise SpecError(f"invalid YAML: {getattr(e, 'problem', e)}", where=f"{source}{line}") from None

    def where(self, node) -> str:
        return f"{self.source}:{node.start_mark.line + 1}"

    def value(self, node):
        return self.loader.construct_object(node, deep=True)

    def mapping(self, node, allowed: set[str], what: str) -> dict:
        if not isinstance(node, self.yaml.MappingNode):
            raise SpecError(f"{what} must be a mapping", where=self.where(node))
        out = {}
        for key_node, value_node in node.value:
            key = self.value(key_node)
            if key not in allowed:
                raise SpecError(f"unknown key {key!r} in {what}", where=self.where(key_node),
                                hint=f"allowed: {', '.join(sorted(allowed))}")
            if key in out:
                raise SpecError(f"duplicate key {key!r} in {what}", where=self.where(key_node))
            out[key] = value_node
        return out

    def seq(self, node, what: str) -> list:
        if not isinstance(node, self.yaml.SequenceNode):
            raise SpecError(f"{what} must be a list", where=self.where(node))
        return list(node.value)

    def choice(self, node, choices: tuple[str, ...], what: str) -> str:
        value = self.value(node)
        if value is False and "deny" in choices:
            value = "deny"
        if value is True and "allow" in choices:
            value = "allow"
        if value not in choices:
            raise SpecError(f"{what} must be one of {', '.join(choices)}, not {value!r}",
                            where=self.where(node))
        return value

    def string(self, node, what: str) -> str:
        value = self.value(node)
        if not isinstance(value, str) or not value:
            raise SpecError(f"{what} must be a non-empty string", where=self.where(node))
        return value


def ports(doc: YamlDoc, node, what: str) -> tuple[int, int]:
    value = doc.value(node)
    if isinstance(value, int) and not isinstance(value, bool):
        lo = hi = value
    elif isinstance(value, str) and "-" in value:
        try:
            lo, hi = (int(p) for p in value.split("-", 1))
        except ValueError:
            raise SpecError(f"{what} must be a port or a range like 1024-65535",
                            where=doc.where(node)) from None
    else:
        raise SpecError(f"{what} must be a port or a range like 1024-65535", where=doc.where(node))
    if not 0 <= lo <= hi <= 65535:
        raise SpecError(f"{what} {value!r} is outside 0-65535 or reversed", where=doc.where(node))
    return lo, hi
