"""The import graph of llama2_jax/ and train/ (read from the source, nothing imported): no circle, the library never
imports the trainer programs (train/), nothing outside llama2_jax/cli/ imports the command lines (the trainer layer,
llama2_jax/training/, least of all), no grab-bag `common` module and no re-export in the trainer layer or the
programs, the top of llama2_jax/ holds at most 8 modules, and the curated top-level API resolves. An `if __name__ == "__main__":` block is
not an import of the module: it runs only when the file is the program (`python -m llama2_jax.generate` delegating to
its CLI)."""

import ast
import importlib
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("llama2_jax", "train")
# Imports inside a function body that stay there on purpose: each needs an optional extra (lm-eval, fastapi,
# tensorflow-datasets, Hugging Face datasets) or runs only in one command of the program. None breaks a circle.
FUNCTION_LEVEL_ALLOWED = {
    ("llama2_jax.cli.evaluate", "llama2_jax.evaluation.lm_eval_backend"),  # lm-eval
    ("llama2_jax.cli.evaluate", "llama2_jax.evaluation.reward_model"),  # matplotlib, only with --reward_model
    ("llama2_jax.cli.serve", "llama2_jax.serve.engine"), ("llama2_jax.cli.serve", "llama2_jax.serve.api"),  # fastapi
    ("llama2_jax.evaluation.harness", "llama2_jax.evaluation.lm_eval_backend"),  # lm-eval
    ("llama2_jax.evaluation.lm_eval_backend", "llama2_jax.checkpoints.params_io"),
    ("llama2_jax.data.records", "llama2_jax.data.hf_source"), ("llama2_jax.data.sources", "llama2_jax.data.hf_source"),
}


def module_files() -> dict[str, pathlib.Path]:
    files = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _imports(node: ast.AST, modules: set) -> set:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if isinstance(node, ast.ImportFrom) and node.module:
        subs = {f"{node.module}.{alias.name}" for alias in node.names} & modules
        return subs or {node.module}
    return set()


def imported_names(tree: ast.AST, modules: set, in_function: bool = False) -> set:
    """(module, imported inside a function body) for every import, `__main__` blocks excluded; `from pkg import
    submodule` counts as the submodule."""
    names = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            continue
        names |= {(name, in_function) for name in _imports(node, modules)}
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        names |= imported_names(node, modules, inner)
    return names


def import_graph(function_level: bool = True) -> dict[str, set]:
    files = module_files()
    graph = {}
    for name, path in files.items():
        imported = imported_names(ast.parse(path.read_text()), set(files))
        graph[name] = {m for m, lazy in imported
                       if m != name and (function_level or not lazy) and m.split(".")[0] in PACKAGES}
    return graph


def test_library_imports_neither_trainers_nor_command_lines():
    for name, imported in import_graph().items():
        if name.startswith("llama2_jax"):
            assert not [m for m in imported if m.split(".")[0] == "train"], name
        if not name.startswith(("llama2_jax.cli", "train.")):
            assert not [m for m in imported if m.startswith("llama2_jax.cli")], name


def test_the_trainer_layer_imports_no_command_line_and_re_exports_nothing():
    graph = import_graph()
    layer = [name for name in graph if name.startswith("llama2_jax.training")]
    assert len(layer) > 15 and "llama2_jax.training.setup" in layer
    for name in layer:
        assert not [m for m in graph[name] if m.startswith("llama2_jax.cli")], name
    for package in ("train", "llama2_jax/training"):
        assert not (ROOT / package / "common.py").exists(), package
        for path in (ROOT / package).glob("*.py"):
            assert path.name == "__init__.py" or "noqa: F401" not in path.read_text(), path


def test_no_import_circle():
    files = module_files()
    graph = {name: {m for m in deps if m in files} for name, deps in import_graph().items()}
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

    assert len(graph) > 40 and "train.pretrain" in graph and "llama2_jax.training.loop" in graph
    for name in sorted(graph):
        visit(name)


def test_function_level_imports_of_project_modules_are_only_the_listed_ones():
    files = module_files()
    found = set()
    for name, path in files.items():
        found |= {(name, m) for m, lazy in imported_names(ast.parse(path.read_text()), set(files))
                  if lazy and m.split(".")[0] in PACKAGES}
    assert found <= FUNCTION_LEVEL_ALLOWED, sorted(found - FUNCTION_LEVEL_ALLOWED)


def test_top_of_the_library_is_small_and_the_curated_api_resolves():
    top = sorted(p.stem for p in (ROOT / "llama2_jax").glob("*.py") if p.stem != "__init__")
    assert len(top) <= 8, top
    import llama2_jax

    assert llama2_jax.__all__ == sorted(["LlamaConfig", "get_config", "Llama", "load_params", "save_params", "Tokenizer",
                                         "encode_dialog", "text_completion", "chat_completion", "make_mesh"])
    for name in llama2_jax.__all__:
        assert getattr(llama2_jax, name).__module__.startswith("llama2_jax."), name
    importlib.import_module("llama2_jax.training.loop")
