"""tests/ mirrors the library (read from the files, nothing imported): every module of llama2_jax/ has a test file of
its name in the folder of its subpackage (llama2_jax/model/lora.py -> tests/model/test_lora.py) or is named in the
"Covers ..." paragraph of the module docstring of the test file that covers it; test files live in a folder of tests/,
have unique names, stay under 500 lines and import helpers from tests/conftest.py and tests/helpers/, never from
another test file. docs/contributing.md describes the layout."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
LIBRARY = ROOT / "llama2_jax"
# The folders of tests/: one per subpackage of llama2_jax/, the trainer programs (train/), and whole-system checks
# (faults, multi-host, the recipe's processes, the notebook, the docs, the import graph, the benchmarks, this file).
FOLDERS = {p.name for p in LIBRARY.iterdir() if (p / "__init__.py").is_file()} | {"train", "system"}
MAX_LINES = 500


def all_test_files() -> list[pathlib.Path]:
    return sorted(TESTS.rglob("test_*.py"))


def is_forwarder(path: pathlib.Path) -> bool:
    """A `python -m llama2_jax.X` forwarder: nothing but a docstring, imports and an `if __name__ == "__main__":` block
    that calls the command line's main (llama2_jax/chat.py, llama2_jax/serve/__main__.py); the command line itself is
    tested under tests/cli/."""
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return bool(body) and all(
        isinstance(node, (ast.Import, ast.ImportFrom))
        or (isinstance(node, ast.If) and ast.unparse(node.test) in ("__name__ == '__main__'", '"__main__" == __name__'))
        for node in body)


def library_modules() -> list[pathlib.Path]:
    return sorted(p for p in LIBRARY.rglob("*.py") if p.name != "__init__.py" and not is_forwarder(p))


def dotted(module: pathlib.Path) -> str:
    return ".".join(module.relative_to(ROOT).with_suffix("").parts)


def named_test_files(module: pathlib.Path) -> list[pathlib.Path]:
    """Where a test file of the module's name belongs: the folder of its subpackage (any folder for a module at the
    top of llama2_jax/)."""
    parts = module.relative_to(LIBRARY).parts
    folder = parts[0] if len(parts) > 1 else "*"
    return list(TESTS.glob(f"{folder}/test_{module.stem}.py"))


def covers_paragraphs() -> dict[pathlib.Path, str]:
    """The "Covers llama2_jax.X, llama2_jax.Y and llama2_jax.Z." paragraphs of the test files' module docstrings (a
    paragraph of its own, so that a module named in passing, as an example, does not count)."""
    paragraphs = {}
    for path in all_test_files():
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        paragraphs[path] = "\n".join(p for p in docstring.split("\n\n") if p.startswith("Covers "))
    return paragraphs


def named_in(text: str, module: pathlib.Path) -> bool:
    """The module's dotted name or its path, as a whole name (llama2_jax.inference.generate is not
    llama2_jax.inference.generate_x)."""
    names = (dotted(module), module.relative_to(ROOT).as_posix())
    return any(re.search(rf"(?<![\w./]){re.escape(name)}(?![\w/])", text) for name in names)


def test_every_library_module_has_a_test_file_of_its_name_or_is_named_in_one():
    texts = covers_paragraphs()
    missing = [dotted(module) for module in library_modules()
               if not named_test_files(module) and not any(named_in(text, module) for text in texts.values())]
    assert not missing, (f"modules with neither tests/<subpackage>/test_<name>.py nor a \"Covers ...\" paragraph in a "
                         f"test file's docstring naming them: {missing}")


def test_the_forwarders_found_are_only_forwarders():
    """The rule above skips forwarders; a module that grows real code stops being one and needs its test."""
    forwarders = sorted(dotted(p) for p in LIBRARY.rglob("*.py") if p.name != "__init__.py" and is_forwarder(p))
    assert forwarders, "no `python -m` forwarder found: is_forwarder no longer recognises them"
    for name in forwarders:
        text = (ROOT / (name.replace(".", "/") + ".py")).read_text()
        assert "__main__" in text and len(text.splitlines()) < 20, name


def test_test_files_live_in_the_mirrored_folders_with_unique_names():
    files = all_test_files()
    misplaced = [p.relative_to(ROOT).as_posix() for p in files
                 if len(p.relative_to(TESTS).parts) != 2 or p.parent.name not in FOLDERS]
    assert not misplaced, f"test files outside tests/<{'|'.join(sorted(FOLDERS))}>/: {misplaced}"
    # pytest's default import mode imports a test file without __init__.py by its base name
    names = [p.name for p in files]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


def test_test_files_stay_under_the_line_limit():
    long = {p.relative_to(ROOT).as_posix(): n for p in all_test_files() + sorted((TESTS / "helpers").glob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines (split by subject): {long}"


def test_no_test_file_imports_another():
    """Shared helpers live in tests/conftest.py and tests/helpers/: importing a test file from another works only
    while both sit in one folder (pytest puts each test file's own folder on sys.path) and runs its module code."""
    imports = []
    for path in all_test_files() + sorted((TESTS / "helpers").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            imports += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert not imports, imports


def test_the_rule_tells_a_name_from_a_longer_one():
    generate = LIBRARY / "inference" / "generate.py"
    assert named_in("Covers llama2_jax.inference.generate and more.", generate)
    assert named_in("(llama2_jax/inference/generate.py)", generate)
    assert not named_in("Covers llama2_jax.inference.generate_x.", generate)
    assert named_test_files(LIBRARY / "model" / "lora.py") == [TESTS / "model" / "test_lora.py"]
    assert named_test_files(LIBRARY / "serve" / "text.py") == []  # tests/text/ is the text subpackage's folder
