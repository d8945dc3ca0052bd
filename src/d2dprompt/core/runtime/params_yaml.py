"""Read a params file: malformed YAML and repeated keys are one line with the file and line number."""

from __future__ import annotations

from pathlib import Path

import yaml

from d2dprompt.core.runtime.params_errors import ParamsError


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key twice in one mapping (plain YAML keeps the last one, silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<' overrides by design
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, shown: str) -> object:
    """The parsed file; ParamsError '<shown>: line N: <problem>' when it is unreadable or not YAML."""
    if not path.is_file():
        raise ParamsError(f"{shown}: params file not found")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}: " if mark else ""
        raise ParamsError(f"{shown}: {where}invalid YAML: {' '.join(str(err.problem or err).split())}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ParamsError(f"{shown}: unreadable ({' '.join(str(err).split())})") from None
