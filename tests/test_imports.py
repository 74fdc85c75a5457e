"""The package's import graph (read from the source, nothing imported): no circle, the library never imports the
trainers (train/) or the command lines (llama2_jax/cli/). An `if __name__ == "__main__":` block is not an import of
the module: it runs only when the file is the program (`python -m llama2_jax.generate` delegating to its CLI)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "llama2_jax"


def module_files() -> dict[str, pathlib.Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_names(tree: ast.AST, modules: set) -> set:
    """Modules imported anywhere in the tree (lazy imports in functions included), `__main__` blocks excluded;
    `from pkg import submodule` counts as the submodule."""
    names = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            subs = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            names.update(subs or {node.module})
        names |= imported_names(node, modules)
    return names


def import_graph() -> dict[str, set]:
    files = module_files()
    graph = {}
    for name, path in files.items():
        imported = imported_names(ast.parse(path.read_text()), set(files))
        graph[name] = {m for m in imported if m != name and (m in files or m.split(".")[0] == "train")}
    return graph


def test_library_imports_neither_trainers_nor_command_lines():
    for name, imported in import_graph().items():
        assert not [m for m in imported if m.split(".")[0] == "train"], name
        if not name.startswith("llama2_jax.cli"):
            assert not [m for m in imported if m.startswith("llama2_jax.cli")], name


def test_no_import_circle():
    graph = {name: {m for m in deps if m in module_files()} for name, deps in import_graph().items()}
    done, on_path = set(), []

    def visit(name):
        assert name not in on_path, " -> ".join(on_path[on_path.index(name):] + [name])
        if name in done:
            return
        on_path.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        on_path.pop()
        done.add(name)

    assert len(graph) > 20  # the walk found the package
    for name in sorted(graph):
        visit(name)
