"""Read a params file: malformed YAML, repeated keys (merged ones included) and an oversized file are one line with
the file (and line number)."""

from __future__ import annotations

from pathlib import Path

import yaml

from d2dprompt.core.runtime.params_errors import ParamsError

MAX_BYTES = 1 << 20  # the project's params.yaml is ~6 KB; a file of MBs is a mistake, and PyYAML parses ~0.5 MB/s


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key twice in one mapping (plain YAML keeps the last one, silently)."""

    def construct_mapping(self, node, deep=False):
        self._refuse_repeats(node)
        return super().construct_mapping(node, deep)

    def _refuse_repeats(self, node) -> None:
        """A key twice in `node`, or in a mapping merged into it with '<<' (merged mappings are flattened into the
        node without being constructed on their own, so their repeats would pass unseen)."""
        seen: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<' overrides by design; its own mappings may not repeat
                for merged in value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]:
                    if isinstance(merged, yaml.MappingNode):
                        self._refuse_repeats(merged)
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line


def read_yaml(path: Path, shown: str) -> object:
    """The parsed file; ParamsError '<shown>: line N: <problem>' when it is unreadable or not YAML."""
    if not path.is_file():
        raise ParamsError(f"{shown}: params file not found")
    if path.stat().st_size > MAX_BYTES:
        raise ParamsError(f"{shown}: {path.stat().st_size:,} bytes; a params file holds at most {MAX_BYTES:,} (it is settings, not data)")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}: " if mark else ""
        raise ParamsError(f"{shown}: {where}invalid YAML: {' '.join(str(err.problem or err).split())}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ParamsError(f"{shown}: unreadable ({' '.join(str(err).split())})") from None
