"""The layout's rules (docs/dev-notes.md, "Where each concern lives"), checked on the source: commands are thin and
import no other command, library folders import no command, `pipeline` never imports `trainer`, the diffusion core
reaches neither data nor training, and the experiment config loads without the model or data stack."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = sorted(p.stem for p in (REPO / "trainer").glob("*.py") if p.stem != "__init__")
LIBRARIES = ("core", "data", "train", "weights", "eval")


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names (for `from a.b import c`: a.b and a.b.c)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_the_commands_are_the_documented_ones():
    assert COMMANDS == ["checkpoints", "evaluate", "export", "finetune", "pretrain", "quickstart", "sample",
                        "schedule"]
    assert sorted(p.name for p in (REPO / "trainer").iterdir() if p.is_dir() and p.name != "__pycache__") == \
        sorted(LIBRARIES)


@pytest.mark.parametrize("path", sorted((REPO / "trainer").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_no_command_is_imported_by_another_module(path):
    commands = {f"trainer.{c}" for c in COMMANDS} | {"pipeline.shard", "pipeline.merge", "pipeline.verify",
                                                     "pipeline.preview"}
    assert not imported_modules(path) & commands, f"{path} imports a command"


@pytest.mark.parametrize("path", sorted((REPO / "pipeline").rglob("*.py")), ids=lambda p: p.name)
def test_pipeline_never_imports_trainer(path):
    assert not {m for m in imported_modules(path) if m.split(".")[0] == "trainer"}


@pytest.mark.parametrize("path", sorted((REPO / "trainer" / "core").rglob("*.py")), ids=lambda p: p.name)
def test_the_core_reaches_neither_data_nor_training(path):
    reached = {m for m in imported_modules(path) if m.startswith("trainer.") and not m.startswith("trainer.core")}
    assert not reached, f"{path} imports {sorted(reached)}"


def test_commands_are_thin():
    """<= 100 non-blank lines of code in each command (its docstring, the --help text, not counted)."""
    def code_lines(path: Path) -> int:
        body = ast.parse(path.read_text()).body
        start = body[0].end_lineno if body and isinstance(body[0], ast.Expr) else 0
        return sum(1 for line in path.read_text().splitlines()[start:] if line.strip())

    long = {c: n for c in COMMANDS if (n := code_lines(REPO / "trainer" / f"{c}.py")) > 100}
    assert not long, f"commands over 100 lines of code (move the library parts into trainer/<folder>/): {long}"


def test_the_experiment_config_imports_no_model_or_data_stack():
    stacks = ("torch", "fsspec", "PIL", "numpy", "webdataset", "deepspeed")
    code = f"import sys, trainer.train.config, trainer.core.settings; print(sorted(set({stacks}) & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
