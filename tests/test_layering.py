"""Imports inside llama_min run one way.

Every module under llama_min/ is parsed with `ast` (never imported), and every import in it is collected:
module level or inside a function (lazy), under `if TYPE_CHECKING:` or a `try:` alike. Relative imports are
resolved to module names, and `from pkg import name` where `pkg.name` is a module counts as importing that
module. On that graph:

  (a) model.py imports only torch and the standard library;
  (b) formats/ imports only model, text, files, errors and formats itself;
  (c) nothing outside cli/ imports cli/;
  (d) every import goes down the LAYERS below, or stays inside its own package;
  (e) the module graph has no cycle, lazy imports included;
  (f) no private name (`_x`, not a dunder) is imported from another module, or used on one (`mod._x`);
  (g) inside the package, imports of llama_min are relative;
  (h) at most MAX_TOP_MODULES modules at the top of llama_min/ (__init__ and __main__ counted).

Each check is a plain function returning its violations; the self-tests at the bottom feed each one a small
fake package or graph with a violation and check that it is caught.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest


ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "llama_min"

# Layers, lowest first. A module may import modules of its own entry (a package's modules import each other)
# and of any lower layer, never of a higher one. Each entry is a module or a package prefix; a module takes
# the longest entry that matches. Entries on one line share a rank and may not import each other. One package
# is one layer: the order is the graph as it stands, read bottom-up:
#
#   errors            the exception types everyone raises; imports nothing
#   files             paths, atomic writes, JSON, the GGUF container, hub folders (errors)
#   model | text      the reference model (torch + stdlib) | tokenizers and chat formats (files): neither
#                     knows the other
#   formats | assets  checkpoint readers/writers into ModelArgs + tensors (model, text, files) | the fetched
#                     model and vocabulary files (text)
#   checkpoint        the public door to formats/: load_checkpoint, detect_format, convert
#   runtime           fast layouts, quantization, packed GGUF modules, native kernels (formats' tensors, and
#                     assets' cache folder for the compiled kernels)
#   parallel          per-rank reading of checkpoint files (checkpoint, formats), sharded runtime modules
#   decoding          sampling, stops, speculative decoding, chat sessions, perplexity: given a Llama or a
#                     model, never importing generation
#   generation        Llama: builds the model (checkpoint, runtime, parallel), decodes with decoding/
#   train | inspect   training and pictures: may use everything below
#   llama_min         the package's __init__: re-exports of the public API from below
#   cli               the command line: may use everything (its --version comes from the package)
#   __main__          runs the cli
LAYERS: List[Tuple[str, ...]] = [
    ("errors",),
    ("files",),
    ("model", "text"),
    ("formats", "assets"),
    ("checkpoint",),
    ("runtime",),
    ("parallel",),
    ("decoding",),
    ("generation",),
    ("train", "inspect"),
    ("serve",),
    ("",),  # "" is llama_min/__init__.py
    ("cli",),
    ("__main__",),
]

MAX_TOP_MODULES = 8


# --------------------------------------------------------------------------------------------- the graph


@dataclass
class Import:
    module: str  # the full module name imported (llama_min.x.y, or an outside one like torch.nn)
    names: Tuple[str, ...] = ()  # for `from module import a, b`: a, b (submodules already split off)
    relative: bool = False  # written with leading dots
    line: int = 0
    bound: Optional[str] = None  # the local name a whole module is bound to (`from . import native as nv`)


@dataclass
class Module:
    name: str  # llama_min.formats.hf; a package's __init__ is the package: llama_min.formats
    rel: str  # its path, for messages: llama_min/formats/hf.py
    is_package: bool
    imports: List[Import] = field(default_factory=list)
    private_uses: List[Tuple[str, str, int]] = field(default_factory=list)  # (module, _name, line): mod._name


def module_name(rel: Path) -> Tuple[str, bool]:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def within(name: str, prefix: str) -> bool:
    """`name` is the module or package `prefix`, or inside it."""
    return name == prefix or name.startswith(prefix + ".")


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def parse_imports(source: str, name: str, is_package: bool, known: Set[str]) -> List[Import]:
    """All imports in `source` (at any depth), resolved against module `name`; `known` are the modules."""
    out: List[Import] = []
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend(Import(alias.name, (), False, node.lineno, alias.asname) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:  # `from pkg import module`: an import of that module
                    out.append(Import(sub, (), bool(node.level), node.lineno, alias.asname or alias.name))
                else:
                    names.append(alias.name)
            if names:
                out.append(Import(target, tuple(names), bool(node.level), node.lineno))
    return out


def private_uses(source: str, imports: List[Import], known: Set[str]) -> List[Tuple[str, str, int]]:
    """`mod._x` where `mod` is a name this file bound to one of the `known` modules by an import."""
    bound = {imp.bound: imp.module for imp in imports if imp.bound and imp.module in known}
    return [(bound[node.value.id], node.attr, node.lineno) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id in bound and is_private(node.attr)]


def load_package(root: Path = ROOT, package: str = PACKAGE) -> Dict[str, Module]:
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root)
        name, is_package = module_name(rel)
        modules[name] = Module(name, rel.as_posix(), is_package)
    known = set(modules)
    for mod in modules.values():
        source = (root / mod.rel).read_text(encoding="utf-8")
        mod.imports = parse_imports(source, mod.name, mod.is_package, known)
        mod.private_uses = private_uses(source, mod.imports, known)
    return modules


def internal_edges(modules: Dict[str, Module], package: str = PACKAGE) -> Dict[str, Set[str]]:
    """importer -> the package's modules it imports (`from pkg import x` of a non-module x: pkg)."""
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for mod in modules.values():
        for imp in mod.imports:
            if within(imp.module, package):
                target = imp.module
                while target not in modules and "." in target:  # `import llama_min.a.b.c` of a non-module
                    target = target.rpartition(".")[0]
                if target != mod.name:
                    graph[mod.name].add(target)
    return graph


# --------------------------------------------------------------------------------------------- the checks
# Each returns a list of violations: (check, importer, imported, message).

Violation = Tuple[str, str, str, str]


def short(name: str, package: str = PACKAGE) -> str:
    """llama_min.formats.hf -> formats.hf; the package itself -> ""."""
    return name[len(package) + 1:] if name.startswith(package + ".") else ("" if name == package else name)


def check_model_imports(modules: Dict[str, Module], package: str = PACKAGE) -> List[Violation]:
    """(a) model.py: torch and the standard library only."""
    mod = modules.get(f"{package}.model")
    if mod is None:
        return []
    bad = []
    for imp in mod.imports:
        top = imp.module.split(".")[0]
        if top != "torch" and top not in sys.stdlib_module_names and top != "__future__":
            bad.append(("model", mod.name, imp.module, f"{mod.rel}:{imp.line} imports {imp.module}"))
    return bad


FORMATS_MAY_IMPORT = ("model", "text", "files", "errors", "formats")


def check_formats_imports(graph: Dict[str, Set[str]], package: str = PACKAGE) -> List[Violation]:
    """(b) formats/: model, text, files, errors and itself only."""
    bad = []
    for importer, targets in graph.items():
        if not within(short(importer, package), "formats"):
            continue
        for target in targets:
            if not any(within(short(target, package), ok) for ok in FORMATS_MAY_IMPORT):
                bad.append(("formats", importer, target, f"{importer} imports {target}"))
    return bad


def check_no_cli_imports(graph: Dict[str, Set[str]], package: str = PACKAGE) -> List[Violation]:
    """(c) only cli/ itself, __main__ and nothing else import cli/."""
    bad = []
    for importer, targets in graph.items():
        if within(short(importer, package), "cli") or short(importer, package) == "__main__":
            continue
        for target in targets:
            if within(short(target, package), "cli"):
                bad.append(("cli", importer, target, f"{importer} imports {target}"))
    return bad


def layer_of(name: str, layers: List[Tuple[str, ...]], package: str = PACKAGE) -> Tuple[int, str]:
    """(rank, the matching entry) of module `name`: the longest entry that is a prefix of it."""
    rel = short(name, package)
    best: Optional[Tuple[int, str]] = None
    for rank, entries in enumerate(layers):
        for entry in entries:
            if (entry == "" and rel == "") or (entry and within(rel, entry)):
                if best is None or len(entry) > len(best[1]):
                    best = (rank, entry)
    if best is None:
        raise AssertionError(f"{name} is in no layer of LAYERS: add it")
    return best


def check_layers(graph: Dict[str, Set[str]], layers: List[Tuple[str, ...]] = LAYERS,
                 package: str = PACKAGE) -> List[Violation]:
    """(d) every import goes down the layers, or stays inside its own layer entry (its package)."""
    bad = []
    for importer, targets in graph.items():
        rank, entry = layer_of(importer, layers, package)
        for target in targets:
            t_rank, t_entry = layer_of(target, layers, package)
            if t_entry == entry or t_rank < rank:
                continue
            bad.append(("layers", importer, target,
                        f"{importer} (layer {rank}: {entry or package}) imports {target} "
                        f"(layer {t_rank}: {t_entry or package})"))
    return bad


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    white, grey, black = 0, 1, 2
    color = {node: white for node in graph}
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        color[node] = grey
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if color.get(nxt, white) == grey:
                return stack[stack.index(nxt):] + [nxt]
            if color.get(nxt, white) == white and nxt in graph:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        color[node] = black
        return None

    for node in sorted(graph):
        if color[node] == white:
            found = visit(node)
            if found:
                return found
    return None


def check_private_names(modules: Dict[str, Module], package: str = PACKAGE) -> List[Violation]:
    """(f) `from other import _x`, or `other._x` on a module imported whole: a private name crossing modules
    (dunders are fine)."""
    bad = []
    for mod in modules.values():
        for imp in mod.imports:
            if within(imp.module, package):
                bad.extend(("private", mod.name, f"{imp.module}:{name}",
                            f"{mod.rel}:{imp.line} imports {name} from {imp.module}")
                           for name in imp.names if is_private(name))
        bad.extend(("private", mod.name, f"{other}:{name}", f"{mod.rel}:{line} uses {other}.{name}")
                   for other, name, line in mod.private_uses if other != mod.name)
    return bad


def check_relative(modules: Dict[str, Module], package: str = PACKAGE) -> List[Violation]:
    """(g) no `import llama_min...` / `from llama_min... import` inside the package."""
    bad = []
    for mod in modules.values():
        for imp in mod.imports:
            if not imp.relative and within(imp.module, package):
                bad.append(("relative", mod.name, imp.module, f"{mod.rel}:{imp.line} imports {imp.module} absolutely"))
    return bad


def check_top_count(modules: Dict[str, Module], package: str = PACKAGE,
                    limit: int = MAX_TOP_MODULES) -> List[Violation]:
    """(h) at most `limit` modules directly in the package folder."""
    top = sorted(name for name, mod in modules.items()
                 if name == package or (name.count(".") == 1 and not mod.is_package))
    if len(top) > limit:
        return [("top", package, ", ".join(top), f"{len(top)} modules at the top of {package}/: {top}")]
    return []


# --------------------------------------------------------------------------------------------- the tests


def assert_clean(found: List[Violation], title: str) -> None:
    """No violation in `found` (each is named in the message)."""
    assert not found, f"{title}:\n  " + "\n  ".join(sorted(message for *_, message in found))


MODULES = load_package()
GRAPH = internal_edges(MODULES)


RULES = {  # test id: (what a violation means, the check)
    "model-imports-only-torch-and-stdlib": ("model.py imports more than torch and the standard library",
                                            lambda: check_model_imports(MODULES)),
    "formats-imports-only-model-text-files-errors": ("formats/ imports outside model, text, files, errors",
                                                     lambda: check_formats_imports(GRAPH)),
    "nothing-imports-cli": ("a library module imports cli/", lambda: check_no_cli_imports(GRAPH)),
    "imports-go-down-the-layers": ("imports going up the layers (LAYERS)", lambda: check_layers(GRAPH)),
    "no-private-name-crosses-modules": ("private names imported from another module",
                                        lambda: check_private_names(MODULES)),
    "imports-inside-the-package-are-relative": ("absolute llama_min imports inside llama_min/",
                                                lambda: check_relative(MODULES)),
    "few-modules-at-the-top": ("too many modules at the top of llama_min/", lambda: check_top_count(MODULES)),
}


@pytest.mark.parametrize("rule", RULES)
def test_the_package_keeps_the_rule(rule):
    title, check = RULES[rule]
    assert_clean(check(), title)


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle (lazy imports included): " + " -> ".join(cycle)


def fake_package(tmp_path: Path, files: Dict[str, str]) -> Dict[str, Module]:
    for rel, source in files.items():
        path = tmp_path / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    return load_package(tmp_path, PACKAGE)


def test_self_parse_resolves_relative_lazy_and_submodule_imports(tmp_path):
    mods = fake_package(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "formats/__init__.py": "",
        "formats/gguf/__init__.py": "",
        "formats/gguf/read.py": "from ... import errors\nfrom ..common import x\n",
        "formats/common.py": "def f():\n    from ..text import tokenizer\n    import json\n",
        "text/__init__.py": "",
        "text/tokenizer.py": "",
    })
    graph = internal_edges(mods)
    assert graph["llama_min.formats.gguf.read"] == {"llama_min.errors", "llama_min.formats.common"}
    assert graph["llama_min.formats.common"] == {"llama_min.text.tokenizer"}  # lazy, and a submodule


def test_self_model_check_catches_numpy(tmp_path):
    mods = fake_package(tmp_path, {"__init__.py": "", "model.py": "import torch, math\nimport numpy as np\n"})
    assert [v[2] for v in check_model_imports(mods)] == ["numpy"]


def test_self_formats_check_catches_runtime(tmp_path):
    mods = fake_package(tmp_path, {
        "__init__.py": "", "formats/__init__.py": "", "runtime/__init__.py": "", "runtime/packed.py": "",
        "formats/hf.py": "from ..model import M\ndef f():\n    from ..runtime.packed import p\n",
        "model.py": "",
    })
    assert [v[2] for v in check_formats_imports(internal_edges(mods))] == ["llama_min.runtime.packed"]


def test_self_cli_check_catches_a_library_module(tmp_path):
    mods = fake_package(tmp_path, {
        "__init__.py": "", "__main__.py": "from .cli import main\n", "cli/__init__.py": "", "cli/eval.py": "",
        "decoding/__init__.py": "", "decoding/perplexity.py": "from ..cli import eval\n",
    })
    assert [v[1] for v in check_no_cli_imports(internal_edges(mods))] == ["llama_min.decoding.perplexity"]


def test_self_layer_check_catches_an_upward_import():
    graph = {"llama_min.files": {"llama_min.errors"}, "llama_min.errors": set(),
             "llama_min.text.base": {"llama_min.files", "llama_min.text.chat", "llama_min.model"},
             "llama_min.text.chat": set(), "llama_min.model": set(),
             "llama_min.decoding.sampling": {"llama_min.generation"}, "llama_min.generation": set(),
             "llama_min": {"llama_min.generation", "llama_min.cli"}, "llama_min.cli": set()}
    found = sorted((v[1], v[2]) for v in check_layers(graph))
    assert found == [("llama_min", "llama_min.cli"),  # the package's __init__ ranks below cli
                     ("llama_min.decoding.sampling", "llama_min.generation"),  # up
                     ("llama_min.text.base", "llama_min.model")]  # same rank, another entry


def test_self_cycle_check_prints_the_cycle(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    mods = fake_package(tmp_path, {  # a cycle closed by a lazy import inside a method
        "__init__.py": "", "checkpoint.py": "from .parallel import slicing\n", "parallel/__init__.py": "",
        "parallel/slicing.py": "class R:\n    def read(self):\n        from ..checkpoint import load\n",
    })
    assert find_cycle(internal_edges(mods)) == ["llama_min.checkpoint", "llama_min.parallel.slicing",
                                                "llama_min.checkpoint"]


def test_self_private_check_catches_underscore_names(tmp_path):
    mods = fake_package(tmp_path, {
        "__init__.py": "", "text/__init__.py": "", "text/gguf_vocab.py": "_B = 1\n",
        "formats/__init__.py": "", "formats/hf.py": "def _files(): pass\n_files()\n",
        "formats/write.py": "from __future__ import annotations\nfrom ..text.gguf_vocab import _B, __doc__\n"
                            "import os\nfrom os import _exit\nfrom . import hf as h\nh._files()\nh.__name__\n",
    })
    assert sorted(v[2] for v in check_private_names(mods)) == ["llama_min.formats.hf:_files",
                                                               "llama_min.text.gguf_vocab:_B"]


def test_self_relative_check_catches_absolute_imports(tmp_path):
    mods = fake_package(tmp_path, {"__init__.py": "", "errors.py": "",
                                   "files.py": "from . import errors\ndef f():\n    import llama_min.errors\n"})
    assert [v[1] for v in check_relative(mods)] == ["llama_min.files"]


def test_self_top_count_check(tmp_path):
    files = {"__init__.py": "", "__main__.py": "", "sub/__init__.py": ""}
    files.update({f"m{i}.py": "" for i in range(6)})
    assert check_top_count(fake_package(tmp_path, files)) == []  # 8: fine
    (tmp_path / PACKAGE / "m6.py").write_text("", encoding="utf-8")
    assert len(check_top_count(load_package(tmp_path, PACKAGE))) == 1
