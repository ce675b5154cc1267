"""Import layers: data flows one way, and this test fails when a module reaches back upstream or two modules import
each other.

Layers, top to bottom; a module may import its own layer and every layer below it, never one above or beside it:

    cli            cbt_llm/cli/          the `cbt-llm` command: one module per subcommand; nothing imports it
    serve          serve/                the OpenAI-compatible server and the chat, behind the guard
    evaluation     evaluation/           scores what the stages made
    launch         launch/               how a training run reaches machines (a library the CLI calls)
    train          train/                shards in, checkpoints and metrics out
    data_pipeline  data_pipeline/        corpus in, tokenized packed shards out
    inference      cbt_llm/inference/    model loading and generation, under train, evaluation, serve and synth
    domain         cbt_llm/domain/       CBT knowledge as data and pure functions: parts, crisis policy, guard,
                                         record schema, chat format, prompts, rubrics, structure scorer
    core           cbt_llm/core/         config tree, errors, report tables, file helpers (and cbt_llm/core/config/,
                                         its compatibility name)

serve, evaluation and launch are one tier: none imports another. train and launch read the data stage's output
through its contract module (data_pipeline.shards) only, never through its producer.

Every import counts: top-level and inside functions, `import x`, `from x import y` (y a module or not), relative
imports, and importlib.import_module / __import__ with a literal name. Import cycles between product modules fail
too, function-level imports included: a helper two modules share belongs in a module below both.

Outside the product, bench/ may import any product layer and the test fixtures (tests/fixtures/), never a test
module; tests/ may import anything and is not walked. No product module imports bench or tests, and none edits
sys.path (the install or PYTHONPATH says where code comes from).
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from tests.fixtures.paths import ROOT

WALKED = ("cbt_llm", "data_pipeline", "train", "launch", "evaluation", "serve", "bench")
ORDER = ("cli", ("serve", "evaluation", "launch"), "train", "data_pipeline", "inference", "domain", "core")
PRODUCT = ("cli", "serve", "evaluation", "launch", "train", "data_pipeline", "inference", "domain", "core")


def _below(order=ORDER) -> dict[str, set[str]]:
    """layer -> the layers it may import: its own and every tier below its tier."""
    tiers = [t if isinstance(t, tuple) else (t,) for t in order]
    allowed = {}
    for i, tier in enumerate(tiers):
        lower = {layer for t in tiers[i + 1 :] for layer in t}
        for layer in tier:
            allowed[layer] = {layer} | lower
    return allowed


ALLOWED = _below() | {"bench": set(PRODUCT) | {"bench", "fixtures"}}
# train and launch read the data stage's output through its contract module, never through its producer
CONTRACT = "data_pipeline.shards"
# Imports that break a rule and are being removed on another branch; each entry must still be needed:
PENDING: set[tuple[str, str]] = set()  # (file, module) imports known to break a rule while being fixed


def _layer(dotted: str) -> str | None:
    """The layer of a module by its dotted name (None: not ours)."""
    parts = dotted.split(".")
    if parts[0] == "cbt_llm":
        sub = parts[1] if len(parts) > 1 else ""
        return {"cli": "cli", "inference": "inference", "domain": "domain"}.get(sub, "core")
    if parts[0] == "tests":
        return "fixtures" if len(parts) > 1 and parts[1] == "fixtures" else "tests"
    return parts[0] if parts[0] in ("data_pipeline", "train", "launch", "evaluation", "serve", "bench") else None


def layer_of_file(rel: str) -> str | None:
    """The layer of a source file, by its path relative to the repository root."""
    return _layer(_module_of(rel))


def layer_of_module(name: str) -> str | None:
    """The layer of an imported module (None: not ours)."""
    return _layer(name)


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


def _product_files(root: Path):
    for top in WALKED:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if layer_of_file(rel) in PRODUCT:
                yield rel, path


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


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the product modules it imports (any import, anywhere in the file), over every product module. An
    import of a package counts as an import of its __init__; importing `a.b.c` runs a and a.b first, so those
    count too."""
    modules = {_module_of(rel): path for rel, path in _product_files(root)}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for rel, path in _product_files(root):
        me = _module_of(rel)
        for _, mod in imported_modules(rel, path.read_text(encoding="utf-8"), root):
            parts = mod.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                # a package's __init__ that its own submodule "imports" by running first is no edge of its own
                if target in modules and target != me and not me.startswith(target + "."):
                    graph[me].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, edges = work[-1]
            for w in edges:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    scc = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        scc.append(w)
                        if w == node:
                            break
                    if len(scc) > 1:
                        cycles.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_the_tree_keeps_its_layers():
    found = check_tree()
    broken = [msg for key, msg in sorted(found.items()) if key not in PENDING]
    assert not broken, "imports against the layers (see this file's docstring):\n" + "\n".join(broken)
    stale = sorted(PENDING - set(found))
    assert not stale, f"no longer needed, take off PENDING in {__file__}: {stale}"


def test_no_import_cycles_between_product_modules():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles (move the shared helper to a module below both):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def test_walked_folders_exist_and_the_cli_is_the_top():
    assert all((ROOT / top).is_dir() for top in WALKED)
    assert layer_of_file("cbt_llm/cli/__init__.py") == "cli" and layer_of_file("cbt_llm/cli/train.py") == "cli"
    assert layer_of_file("cbt_llm/core/config/train.py") == "core" and layer_of_file("cbt_llm/core/config/") == "core"
    assert layer_of_file("cbt_llm/domain/guard.py") == "domain"
    # the CLI really is the top: it imports every stage (lazily, inside its subcommands), and nothing imports it
    graph = import_graph()
    cli = {layer_of_module(t) for m, targets in graph.items() if layer_of_module(m) == "cli" for t in targets}
    assert {"data_pipeline", "train", "launch", "evaluation", "serve", "core"} <= cli
    assert not [
        m for m, targets in graph.items() if layer_of_module(m) != "cli" and any("cbt_llm.cli" in t for t in targets)
    ]


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
            "from data_pipeline.tokenizer import train_tokenizer\n",
            "through data_pipeline.shards only",
        ),
        ("train/recipe.py", "from cbt_llm.cli import main\n", "train imports cbt_llm.cli (cli layer)"),
        (
            "cbt_llm/core/config/root.py",
            "def f():\n    from data_pipeline import io\n",
            "core imports data_pipeline.io",
        ),
        ("cbt_llm/core/report.py", "import importlib\nimportlib.import_module('train.recipe')\n", "core imports train"),
        ("cbt_llm/core/errors.py", "from cbt_llm.domain import crisis\n", "core imports cbt_llm.domain.crisis"),
        (
            "cbt_llm/domain/guard.py",
            "from cbt_llm.inference.hf import HFGenerator\n",
            "domain imports cbt_llm.inference",
        ),
        ("cbt_llm/domain/crisis.py", "from data_pipeline.synth import template\n", "domain imports data_pipeline"),
        ("cbt_llm/inference/models.py", "from data_pipeline.shards import IGNORE\n", "inference imports data_pipeline"),
        ("cbt_llm/inference/hf.py", "from evaluation import run\n", "inference imports evaluation.run"),
        ("launch/submit.py", "from tests.fixtures.train import make_shards\n", "launch imports tests"),
        ("launch/submit.py", "import bench.train_bench\n", "launch imports bench.train_bench (bench layer)"),
        ("serve/app.py", "import tests.fixtures.tiny\n", "serve imports tests.fixtures.tiny (fixtures layer)"),
        (
            "bench/train_bench.py",
            "from tests.unit.data_pipeline import test_prepare\n",
            "bench imports tests.unit.data_pipeline.test_prepare",
        ),
        ("launch/ray_job.py", "import sys\nsys.path.insert(0, '.')\n", "edits sys.path"),
        ("train/data.py", "import sys\nsys.path = ['.']\n", "edits sys.path"),
        ("data_pipeline/prepare/pipeline.py", "from evaluation.questions import load_heldout\n", "(evaluation layer)"),
        ("train/recipe.py", "def f():\n    import evaluation.intrain\n", "train imports evaluation.intrain"),
        ("launch/submit.py", "from evaluation import questions\n", "launch imports evaluation.questions"),
        ("evaluation/run.py", "from launch.render import TrainCommand\n", "evaluation imports launch.render"),
        ("evaluation/safety.py", "from cbt_llm.cli import main\n", "evaluation imports cbt_llm.cli"),
        ("evaluation/questions.py", "import sys\nsys.path.append('..')\n", "edits sys.path"),
        ("evaluation/run.py", "from serve.engine import Engine\n", "evaluation imports serve.engine (serve layer)"),
        ("serve/app.py", "from cbt_llm.cli import main\n", "serve imports cbt_llm.cli (cli layer)"),
        ("serve/engine.py", "from evaluation.judge import Judge\n", "serve imports evaluation.judge"),
    ],
)
def test_a_planted_upstream_import_fails(rel, source, expected):
    msgs = check_source(rel, source)
    assert len(msgs) == 1 and expected in msgs[0], msgs


@pytest.mark.parametrize(
    "rel, source",
    [
        (
            "cbt_llm/cli/train.py",
            "def f():\n    from train.recipe import run_train\n    from launch.submit import run_launch\n",
        ),
        (
            "launch/preflight.py",
            "from data_pipeline.shards import load_manifest\nfrom train.data import steps_per_epoch\n",
        ),
        ("train/data.py", "from data_pipeline.shards import IGNORE\nfrom cbt_llm.core.errors import ConfigError\n"),
        ("data_pipeline/prepare/write.py", "from cbt_llm.core.report import write_metrics\nimport pyarrow\n"),
        ("data_pipeline/synth/api.py", "from cbt_llm.inference.endpoint import EndpointGenerator\n"),
        ("bench/train_bench.py", "from tests.fixtures.train import make_shards\nfrom cbt_llm.cli import main\n"),
        (
            "evaluation/scorer_eval.py",
            "from data_pipeline.synth.template import record_at\nfrom cbt_llm.domain import cbt\n",
        ),
        (
            "cbt_llm/domain/guard.py",
            "from cbt_llm.domain.crisis import detect\nfrom cbt_llm.core.errors import ConfigError\n",
        ),
        ("cbt_llm/inference/hf.py", "from cbt_llm.domain.chat_format import IM_END\n"),
        (
            "serve/engine.py",
            "from cbt_llm.inference.hf import HFGenerator\nfrom cbt_llm.domain.guard import CrisisGuard\n",
        ),
        ("cbt_llm/core/config/", "from cbt_llm.core.config import Config\n"),
    ],
)
def test_imports_down_the_layers_pass(rel, source):
    assert check_source(rel, source) == []


def _copy_tree(dest: Path) -> None:
    for top in WALKED:
        shutil.copytree(ROOT / top, dest / top, ignore=shutil.ignore_patterns("__pycache__", "results"))


def test_a_planted_import_in_a_copy_of_the_tree_fails(tmp_path):
    _copy_tree(tmp_path)
    before = check_tree(tmp_path)
    io = tmp_path / "data_pipeline" / "io.py"
    planted = "\n\ndef _planted():\n    from train import recipe\n"
    io.write_text(io.read_text(encoding="utf-8") + planted, encoding="utf-8")
    after = check_tree(tmp_path)
    assert set(after) - set(before) == {("data_pipeline/io.py", "train.recipe")}


def test_a_planted_cycle_in_a_copy_of_the_tree_fails(tmp_path):
    """Two modules of one layer that import each other, one of them only inside a function: a cycle, found."""
    _copy_tree(tmp_path)
    assert import_cycles(import_graph(tmp_path)) == []
    split = tmp_path / "data_pipeline" / "prepare" / "split.py"
    split.write_text(
        split.read_text(encoding="utf-8") + "\n\ndef _planted():\n    from data_pipeline.prepare import tokens\n",
        encoding="utf-8",
    )
    assert import_cycles(import_graph(tmp_path)) == [["data_pipeline.prepare.split", "data_pipeline.prepare.tokens"]]
