"""The README's shell commands exist as written: programs, modules, make targets and the params keys they set."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
VENV_BIN = Path(sys.executable).parent


def shell_commands(markdown: str) -> list[list[str]]:
    """argv of every command in the ```bash blocks (continuation lines joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


COMMANDS = shell_commands(README)
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def has_key(dotted: str) -> bool:
    node = PARAMS
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def set_params(argv: list[str]) -> list[str]:
    """The key=value / +key=value / ~key items given to `dvc exp run -S` or `ablate --set`."""
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("-S", "--set", "--set-param")]


def test_the_readme_has_commands_and_says_how_to_reach_them():
    assert len(COMMANDS) > 20
    assert ["source", ".venv/bin/activate"] in COMMANDS  # after `make repro` / `make test`, dvc and python -m need the venv


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_each_command_exists_as_written(argv):
    program = argv[0]
    if program == "make":
        targets = re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert all(t in targets for t in argv[1:] if "=" not in t), (argv, targets)
    elif program == "export":
        assert all(re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S+", item) for item in argv[1:]), argv
    elif program == "source":
        assert (Path(sys.prefix) / "bin/activate").is_file() or (ROOT / argv[1]).is_file()
    elif program == "python":
        module = argv[argv.index("-m") + 1]
        assert importlib.util.find_spec(module) is not None, module
    elif "/" in program:
        assert (ROOT / program).is_file() or (VENV_BIN / Path(program).name).is_file(), program
    else:
        assert shutil.which(program, path=f"{VENV_BIN}:{shutil.os.environ.get('PATH', '')}"), program
    for item in set_params(argv):
        key = item.lstrip("+~").split("=", 1)[0]
        if item.startswith("+"):
            assert has_key(key.rsplit(".", 1)[0]) and not has_key(key), item  # adds a key under an existing block
        else:
            assert has_key(key), f"{item}: params.yaml has no {key}"


def narrow_commands() -> list[list[str]]:
    """The commands of README "Reading `dvc exp show` in a narrow terminal": the table, then the CSV."""
    section = README.split("### Reading `dvc exp show` in a narrow terminal", 1)[1].split("\n## ", 1)[0]
    return shell_commands(section)


def check_narrow_view(repo: Path, column: str, methods: int) -> None:
    """Run the README's narrow commands in a repository with experiments: the table keeps the headline column (named
    `column` by DVC), with a value in every row, in at most 120 characters; the CSV has each method's three headline
    metrics. Called by the end-to-end tests with one metrics file (test_ablate.py) and with five (test_methods_pipeline.py)."""
    from tests.conftest import run_cmd

    table_argv, csv_argv = narrow_commands()
    lines = run_cmd(table_argv, repo).stdout.splitlines()
    header = next(line for line in lines if "Experiment" in line)
    assert column in header.split(), header
    assert not [name for name in header.split() if name.endswith(("_lo", "_hi"))], header  # the value, not its interval bounds
    experiments = [line for line in lines if re.search(r"\[[^\]]+\]", line)]  # "├── d6f74a4 [no_image-s1]  0.46637 ..."
    assert experiments and all(re.search(r"\s0\.\d+\s", line) for line in experiments), lines
    assert max(len(line.rstrip()) for line in lines) <= 120, max(len(line) for line in lines)
    header = run_cmd(csv_argv, repo).stdout.splitlines()[0].split(",")
    assert sum(name.endswith(("mean.image_AUROC", "mean.pixel_AUROC", "mean.pixel_AUPRO")) for name in header) == 3 * methods, header
    assert len(header) == 1 + 3 * methods, header  # nothing else: no interval bounds


def test_the_narrow_commands_are_the_table_and_the_csv():
    table, csv = narrow_commands()
    assert "--csv" not in table and "--csv" in csv


def test_the_first_exp_run_says_that_it_changes_params_yaml_and_how_to_keep_the_workspace_clean():
    """`dvc exp run -S` leaves its values in params.yaml: a newcomer's next run silently starts from them."""
    first = next(i for i, argv in enumerate(COMMANDS) if argv[:3] == ["dvc", "exp", "run"])
    after = COMMANDS[first + 1 : first + 8]
    assert any("--temp" in argv for argv in after) and any("--queue" in argv for argv in after)
    assert RESTORE in after
    text = README[README.index("dvc exp run -S attention.mode=full") :][:1200]
    assert "leaves the experiment's values in `params.yaml`" in text


RESTORE = ["make", "restore"]  # the committed params and outputs (Makefile; tests/test_reproducible.py runs it)


def workspace_changes(argv: list[str]) -> bool:
    """A `dvc exp run` that applies its experiment to the workspace (not --temp or --queue) and changes params."""
    return argv[:3] == ["dvc", "exp", "run"] and not {"--temp", "--queue"} & set(argv) and bool(set_params(argv))


def test_the_readme_runs_in_its_own_order_each_experiment_put_back_before_the_next():
    """A newcomer follows the README top to bottom: every `dvc exp run -S` in the workspace leaves its values in
    params.yaml, so the next section's run started from them (fewshot.k=4 then fewshot.mutual=true was refused, the
    API example found several methods). Each one must be put back (RESTORE, or `dvc exp apply`) before the next."""
    changed_by = None
    for argv in COMMANDS:
        starts_from_workspace = argv[:3] == ["dvc", "exp", "run"] and not {"--temp", "--queue"} & set(argv)
        queues_from_workspace = argv[:3] == ["python", "-m", "d2dprompt.pipeline.ablate"] and "--report-only" not in argv
        if changed_by is not None and (starts_from_workspace or queues_from_workspace):
            raise AssertionError(f"`{' '.join(argv)}` starts from the params `{' '.join(changed_by)}` left in params.yaml; "
                                 f"put them back first: {' '.join(RESTORE)}")
        if workspace_changes(argv):
            changed_by = argv
        elif argv == RESTORE or argv[:3] == ["dvc", "exp", "apply"]:
            changed_by = None
    assert changed_by is None, f"the README ends with `{' '.join(changed_by)}`'s params in params.yaml"
