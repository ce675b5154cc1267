"""Import layers: data flows one way (STYLE.md), and this test fails when a module reaches back upstream.

Layers, top to bottom. A module may import its own layer and the layers listed after the arrow:

    cli            cbt_llm/cli.py           -> serve, evaluation, launch, train, data_pipeline, shared   (one
                                               subcommand per stage)
    serve          serve/                   -> evaluation (its generation engine), train, data_pipeline, shared
                                               (the chat server: the crisis guard around a model)
    evaluation     evaluation/              -> train, data_pipeline, shared   (scores what the stages made)
    launch         launch/                  -> train, data_pipeline (its shards contract), shared
    train          train/                   -> data_pipeline (its shards contract), shared
    data_pipeline  data_pipeline/           -> shared
    shared         cbt_llm/ but cli.py      -> nothing of the project (the config tree and report helpers
                                               every stage imports; a stage is never imported back)

So the CLI imports the stages and no product module imports the CLI; the shared config imports no stage.
Outside the product, bench/ may import any product layer (it drives the CLI as a user does) and never tests/;
tests/ may import anything, bench/'s fixtures included, and is not walked here. No product module imports
bench or tests, and none edits sys.path (the install or PYTHONPATH says where code comes from).

Every import counts: top-level and inside functions, `import x`, `from x import y` (y a module or not),
relative imports, and importlib.import_module / __import__ with a literal name.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WALKED = ("cbt_llm", "data_pipeline", "train", "launch", "evaluation", "serve", "bench")
PRODUCT = ("cli", "shared", "data_pipeline", "train", "launch", "evaluation", "serve")
ALLOWED = {
    "cli": {"cli", "serve", "evaluation", "launch", "train", "data_pipeline", "shared"},
    "serve": {"serve", "evaluation", "train", "data_pipeline", "shared"},
    "evaluation": {"evaluation", "train", "data_pipeline", "shared"},
    "launch": {"launch", "train", "data_pipeline", "shared"},
    "train": {"train", "data_pipeline", "shared"},
    "data_pipeline": {"data_pipeline", "shared"},
    "shared": {"shared"},
    "bench": {"bench", "cli", "serve", "evaluation", "launch", "train", "data_pipeline", "shared"},
}
# train and launch read the data stage's output through its contract module, never through its producer
CONTRACT = "data_pipeline.shards"
# Imports that break a rule and are being removed on another branch; each entry must still be needed:
PENDING: set[tuple[str, str]] = set()  # (file, module) imports known to break a rule while being fixed


def layer_of_file(rel: str) -> str | None:
    """The layer of a source file, by its path relative to the repository root."""
    if rel == "cbt_llm/cli.py":
        return "cli"
    top = rel.split("/", 1)[0]
    return "shared" if top == "cbt_llm" else (top if top in WALKED or top == "tests" else None)


def layer_of_module(name: str) -> str | None:
    """The layer of an imported module (None: not ours)."""
    if name == "cbt_llm.cli" or name.startswith("cbt_llm.cli."):
        return "cli"
    top = name.split(".", 1)[0]
    if top == "cbt_llm":
        return "shared"
    return top if top in ("data_pipeline", "train", "launch", "evaluation", "serve", "bench", "tests") else None


def _module_of(rel: str) -> str:
    parts = rel[:-3].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, root: Path) -> bool:
    p = root.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imported_modules(rel: str, source: str, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, module) for every import in `source`, the file at `rel`; `from a import b` names a.b when b is a
    module under `root`, else a."""
    tree = ast.parse(source, filename=rel)
    package = _module_of(rel) if rel.endswith("__init__.py") else _module_of(rel).rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join([*parts, *([base] if base else [])])
            for a in node.names:
                sub = f"{base}.{a.name}" if base else a.name
                found.append((node.lineno, sub if _is_module(sub, root) else base))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _edits_sys_path(node: ast.AST) -> bool:
    def is_sys_path(n: ast.AST) -> bool:
        return (
            isinstance(n, ast.Attribute) and n.attr == "path" and isinstance(n.value, ast.Name) and n.value.id == "sys"
        )

    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return is_sys_path(node.func.value) or (node.func.attr == "addsitedir")
    if isinstance(node, (ast.Assign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value)) for t in targets)
    return False


def check_source(rel: str, source: str, root: Path = ROOT) -> list[str]:
    """Every broken layer rule in one file, as 'path:line: what' (PENDING entries included)."""
    layer = layer_of_file(rel)
    if layer not in ALLOWED:
        return []
    out = []
    for line, mod in imported_modules(rel, source, root):
        target = layer_of_module(mod)
        if target is None:
            continue
        if target not in ALLOWED[layer]:
            out.append(f"{rel}:{line}: {layer} imports {mod} ({target} layer)")
        elif (
            layer in ("train", "launch")
            and target == "data_pipeline"
            and not (mod == CONTRACT or mod.startswith(CONTRACT + "."))
        ):
            out.append(f"{rel}:{line}: {layer} imports {mod}; read the data stage through {CONTRACT} only")
    if layer in PRODUCT:
        out += [f"{rel}:{n.lineno}: edits sys.path" for n in ast.walk(ast.parse(source)) if _edits_sys_path(n)]
    return out


def check_tree(root: Path = ROOT) -> dict[tuple[str, str], str]:
    """{(file, imported module or 'sys.path'): message} for the whole tree under `root`."""
    found = {}
    for top in WALKED:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            for msg in check_source(rel, path.read_text(encoding="utf-8"), root):
                what = msg.split(" imports ", 1)[1].split()[0].rstrip(";") if " imports " in msg else "sys.path"
                found[(rel, what)] = msg
    return found


def test_the_tree_keeps_its_layers():
    found = check_tree()
    broken = [msg for key, msg in sorted(found.items()) if key not in PENDING]
    assert not broken, "imports against the layers (see this file's docstring):\n" + "\n".join(broken)
    stale = sorted(PENDING - set(found))
    assert not stale, f"no longer needed, take off PENDING in {__file__}: {stale}"


def test_walked_folders_exist_and_hold_the_cli():
    assert all((ROOT / top).is_dir() for top in WALKED)
    assert layer_of_file("cbt_llm/cli.py") == "cli" and layer_of_file("cbt_llm/config.py") == "shared"
    # the CLI really is the top: it imports every stage (lazily, inside its subcommands)
    cli = {layer_of_module(m) for _, m in imported_modules("cbt_llm/cli.py", (ROOT / "cbt_llm/cli.py").read_text())}
    assert {"data_pipeline", "train", "launch", "shared"} <= cli


@pytest.mark.parametrize(
    "rel, source, expected",
    [
        (
            "data_pipeline/io.py",
            "def f():\n    from train.data import rank_shards\n",
            "data_pipeline imports train.data",
        ),
        ("data_pipeline/io.py", "import launch.render as r\n", "data_pipeline imports launch.render"),
        ("train/recipe.py", "from launch import render\n", "train imports launch.render"),
        ("train/recipe.py", "from ..launch import render\n", "train imports launch.render"),
        (
            "train/recipe.py",
            "from data_pipeline.tokenizer import load_tokenizer\n",
            "through data_pipeline.shards only",
        ),
        ("train/recipe.py", "from cbt_llm.cli import main\n", "train imports cbt_llm.cli (cli layer)"),
        ("cbt_llm/config.py", "def f():\n    from data_pipeline import io\n", "shared imports data_pipeline.io"),
        (
            "cbt_llm/report.py",
            "import importlib\nimportlib.import_module('train.recipe')\n",
            "shared imports train.recipe",
        ),
        ("launch/submit.py", "from tests.train_fixtures import make_shards\n", "launch imports tests.train_fixtures"),
        ("launch/submit.py", "import bench.fixtures\n", "launch imports bench.fixtures (bench layer)"),
        ("bench/train_bench.py", "from tests import train_fixtures\n", "bench imports tests"),
        ("launch/ray_job.py", "import sys\nsys.path.insert(0, '.')\n", "edits sys.path"),
        ("train/data.py", "import sys\nsys.path = ['.']\n", "edits sys.path"),
        (
            "data_pipeline/prepare/pipeline.py",
            "from evaluation.questions import check_no_train_overlap\n",
            "data_pipeline imports evaluation.questions (evaluation layer)",
        ),
        ("train/recipe.py", "def f():\n    import evaluation.structure\n", "train imports evaluation.structure"),
        ("launch/submit.py", "from evaluation import questions\n", "launch imports evaluation.questions"),
        ("evaluation/structure.py", "from launch.render import TrainCommand\n", "evaluation imports launch.render"),
        ("evaluation/safety.py", "from cbt_llm.cli import main\n", "evaluation imports cbt_llm.cli"),
        ("evaluation/questions.py", "import sys\nsys.path.append('..')\n", "edits sys.path"),
        ("evaluation/run.py", "from serve.engine import Engine\n", "evaluation imports serve.engine (serve layer)"),
        ("serve/app.py", "from cbt_llm.cli import main\n", "serve imports cbt_llm.cli (cli layer)"),
        ("serve/engine.py", "from launch.render import TrainCommand\n", "serve imports launch.render"),
    ],
)
def test_a_planted_upstream_import_fails(rel, source, expected):
    msgs = check_source(rel, source)
    assert len(msgs) == 1 and expected in msgs[0], msgs


@pytest.mark.parametrize(
    "rel, source",
    [
        (
            "cbt_llm/cli.py",
            "def f():\n    from train.recipe import run_train\n    from launch.submit import run_launch\n",
        ),
        (
            "launch/preflight.py",
            "from data_pipeline.shards import load_manifest\nfrom train.data import steps_per_epoch\n",
        ),
        ("train/data.py", "from data_pipeline.shards import IGNORE_INDEX\nfrom cbt_llm.config import ConfigError\n"),
        ("data_pipeline/prepare.py", "from cbt_llm.report import write_metrics\nimport pyarrow\n"),
        ("bench/train_bench.py", "from bench.fixtures import make_shards\nfrom cbt_llm.cli import main\n"),
        (
            "evaluation/structure.py",
            "from data_pipeline.synth_template import record_at\n"
            "from data_pipeline.schema import CBT_PARTS\nfrom cbt_llm.config import ConfigError\n",
        ),
        ("bench/structure_bench.py", "from data_pipeline.structure import train_scorer\n"),
        ("cbt_llm/cli.py", "def f():\n    from evaluation.questions import check_no_train_overlap\n"),
        ("cbt_llm/cli.py", "def f():\n    from serve.app import serve\n"),
        ("serve/engine.py", "from evaluation.generate import HFGenerator\nfrom cbt_llm.guard import CrisisGuard\n"),
    ],
)
def test_imports_down_the_layers_pass(rel, source):
    assert check_source(rel, source) == []


def test_a_planted_import_in_a_copy_of_the_tree_fails(tmp_path):
    for top in WALKED:
        shutil.copytree(ROOT / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__", "results"))
    before = check_tree(tmp_path)
    io = tmp_path / "data_pipeline" / "io.py"
    planted = "\n\ndef _planted():\n    from train import recipe\n"
    io.write_text(io.read_text(encoding="utf-8") + planted, encoding="utf-8")
    after = check_tree(tmp_path)
    assert set(after) - set(before) == {("data_pipeline/io.py", "train.recipe")}
