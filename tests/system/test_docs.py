"""README.md and docs/*.md against the code: every `--config.X` flag they name is a field of the config it is used
with, every `python -m MODULE` they name can be run, every `pip install -e .[EXTRA]` names an extra of setup.cfg,
every repository path (`benchmarks/eval.py`) and dotted name (`llama2_jax.inference.decode.sample`) exists, every
relative link points to an existing file (and heading), and the README stays short with its two fresh-machine
commands on its first screen, the test command exactly as `.ci/run` runs it.

Which config a `--config.X` flag is checked against:
  * in a code block, or an inline code span holding a `python -m` command: the command's own config file
    (`--config=configs/F.py`, or a `configs/F.py` argument as in `sbatch launch/slurm.sbatch configs/70b.py ...`);
    without one, `configs/base.py` (every trainer config is built on it; the trainers have no default config);
  * in prose: `configs/base.py` or any config file named in the same paragraph or table row.
A field component in capitals (`--config.FIELD=VALUE`), a config file `configs/F.py` and a module `MODULE` in capitals
are placeholders; `*` (`--config.paths.*`) stands for any
field of a group. Code blocks in a language other than a shell (```python) hold no commands.
Nothing heavy is imported: the configs import only `llama2_jax.model.config`, and modules are found, not run.
"""

from __future__ import annotations

import ast
import configparser
import functools
import importlib
import importlib.util
import pathlib
import re
import shlex

import pytest

ROOT = next(p for p in pathlib.Path(__file__).resolve().parents if (p / "setup.cfg").is_file())  # wherever tests/ nests
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_BYTES = 12_000
FIRST_SCREEN_LINES = 30  # the two fresh-machine commands end within these lines of the README
SHELL_LANGS = ("bash", "sh", "shell", "console")  # every code block names its language (```text for a tree)

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
CONFIG_FLAG = re.compile(r"--config\.([A-Za-z_*][\w.*]*)")
CONFIG_FILE = re.compile(r"(?<![\w/])configs/[a-z0-9_]+\.py\b")  # configs/F.py is a placeholder
REPO_PATH = re.compile(r"(?<![\w/.])(?:llama2_jax|train|configs|tests|benchmarks|launch|notebooks|docs)/[\w/.*<>-]*")
DOTTED_NAME = re.compile(r"(?<![\w.])(?:llama2_jax|train)(?:\.\w+)+")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
COMMAND_SEPARATORS = ("&&", "||", ";", "|")


# ---------------------------------------------------------------------------------------------------------- parsing


def read(path: pathlib.Path) -> str:
    return path.read_text(encoding="utf-8")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """[(language, body)] of the fenced code blocks."""
    return [(m.group(1).lower(), m.group(2)) for m in FENCE.finditer(text)]


def prose(text: str) -> str:
    """The text outside fenced code blocks (each block replaced by a blank line, so it also ends a paragraph)."""
    return FENCE.sub("\n\n", text)


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs of the prose; every table row is a paragraph of its own."""
    units = []
    for block in re.split(r"\n\s*\n", prose(text)):
        lines = block.split("\n")
        if all(line.lstrip().startswith("|") for line in lines if line.strip()):
            units += [line for line in lines if line.strip()]
        else:
            units.append(block)
    return units


def shell_lines(body: str) -> list[str]:
    """The logical lines of a shell block: backslash continuations joined."""
    return [line for line in body.replace("\\\n", " ").split("\n") if line.strip()]


def unbracket(token: str) -> str:
    """An optional flag is written `[--flag=value]` or `[--a=1 --b=2]`: drop those brackets, not an extra's
    (`.[test,hf]`)."""
    if token.startswith("[-"):
        token = token[1:]
    if token.endswith("]") and "[" not in token:
        token = token[:-1]
    return token


def split_commands(line: str, where: str) -> list[list[str]]:
    """The commands of one shell line as token lists (comments dropped, `&&`, `;`, `|` split)."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as error:
        raise AssertionError(f"{where}: cannot parse {line!r} as a shell line: {error}") from None
    commands, current = [], []
    for token in tokens:
        if token in COMMAND_SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(unbracket(token))
    return [c for c in commands + [current] if c]


def python_module(command: list[str]) -> str | None:
    """MODULE of `python -m MODULE ...` / `python3 -m MODULE ...`, else None."""
    for i, token in enumerate(command[:-2]):
        if re.fullmatch(r"(\S*/)?python3?(\.\d+)?", token) and command[i + 1] == "-m":
            return command[i + 2]
    return None


def command_config(command: list[str]) -> str:
    """The config file a command's --config.X flags belong to (see the module docstring)."""
    for token in command:
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    files = [t for t in command if CONFIG_FILE.fullmatch(t)]
    return files[0] if files else "configs/base.py"


def flag_fields(text: str) -> list[str]:
    return [m.group(1).rstrip(".") for m in CONFIG_FLAG.finditer(text)]


def doc_commands(path: pathlib.Path) -> list[tuple[list[str], str]]:
    """Every shell command of a doc (code blocks, and inline spans holding `python -m`), with where it is."""
    text, found = read(path), []
    for lang, body in code_blocks(text):
        if lang in SHELL_LANGS:
            for line in shell_lines(body):
                found += [(c, f"{path.name}: {line.strip()[:80]}") for c in split_commands(line, path.name)]
    for span in INLINE_CODE.findall(prose(text)):
        if re.search(r"\bpython3? -m ", span):
            found += [(c, f"{path.name}: `{span[:80]}`") for c in split_commands(span, path.name)]
    return found


# ---------------------------------------------------------------------------------------------------------- configs


@functools.lru_cache(maxsize=None)
def load_config(path: str):
    """get_config() of a config file named as `configs/F.py`; None for a config module without get_config."""
    assert (ROOT / path).is_file(), f"{path} does not exist"
    module = importlib.import_module(path[:-3].replace("/", "."))
    return module.get_config() if hasattr(module, "get_config") else None


def has_field(config, field: str) -> bool:
    node = config
    for part in field.split("."):
        if part == "*":
            return hasattr(node, "keys")
        if part.isupper():  # a placeholder (--config.FIELD=VALUE)
            return True
        if not hasattr(node, "keys") or part not in node.keys():
            return False
        node = node[part]
    return True


# ---------------------------------------------------------------------------------------------------------- tests


def test_docs_exist():
    names = {p.name for p in DOCS}
    assert {"README.md", "pretraining.md", "finetuning.md", "rlhf.md", "dpo.md", "evaluation.md", "generation.md",
            "checkpoints.md", "multihost.md", "recipe.md", "contributing.md"} <= names, sorted(names)


def test_code_blocks_name_their_language():
    unlabelled = [path.name for path in DOCS for lang, _ in code_blocks(read(path)) if not lang]
    assert not unlabelled, f"code blocks without a language (```bash, ```python, ```text): {unlabelled}"


def test_config_flags_in_commands_exist():
    checked, missing = 0, []
    for path in DOCS:
        for command, where in doc_commands(path):
            fields = flag_fields(" ".join(command))
            if not fields:
                continue
            config_file = command_config(command)
            config = load_config(config_file)
            assert config is not None, f"{where}: {config_file} has no get_config()"
            for field in fields:
                checked += 1
                if not has_field(config, field):
                    missing.append(f"{where}: --config.{field} is not a field of {config_file}")
    assert not missing, "\n".join(missing)
    assert checked > 30  # the parser found the commands


def test_config_flags_in_prose_exist():
    base = load_config("configs/base.py")
    checked, missing = 0, []
    for path in DOCS:
        for paragraph in paragraphs(read(path)):
            text = INLINE_CODE.sub(lambda m: "" if re.search(r"\bpython3? -m ", m.group(1)) else m.group(0),
                                   paragraph)  # commands in inline spans are checked as commands
            named = [c for c in dict.fromkeys(CONFIG_FILE.findall(text)) if load_config(c) is not None]
            for field in flag_fields(text):
                checked += 1
                if not any(has_field(config, field) for config in [base] + [load_config(c) for c in named]):
                    missing.append(f"{path.name}: --config.{field} is in neither configs/base.py nor "
                                   f"{', '.join(named) or 'a config file named in its paragraph'}: "
                                   f"{' '.join(paragraph.split())[:100]}")
    assert not missing, "\n".join(missing)
    assert checked > 30


def test_python_modules_exist():
    modules, missing = set(), []
    for path in DOCS:
        for command, where in doc_commands(path):
            module = python_module(command)
            if module is None or module.isupper():  # `python -m MODULE` is a placeholder
                continue
            modules.add(module)
            spec = importlib.util.find_spec(module)
            if spec is not None and spec.submodule_search_locations is not None:  # a package runs its __main__
                spec = importlib.util.find_spec(f"{module}.__main__")
            if spec is None:
                missing.append(f"{where}: python -m {module} names no runnable module")
    assert not missing, "\n".join(missing)
    assert {"train.pretrain", "train.sft", "llama2_jax.evaluate", "llama2_jax.serve"} <= modules, sorted(modules)


def test_pip_extras_exist():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    extras = set(setup["options.extras_require"])
    named = {extra for path in DOCS
             for group in re.findall(r"pip install -e ['\"]?\.\[([\w,-]+)\]", read(path)) for extra in group.split(",")}
    assert named, "no pip install -e .[EXTRA] found"
    assert named <= extras, sorted(named - extras)


def heading_anchors(path: pathlib.Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lowercased, punctuation dropped, spaces -> '-', repeats -N."""
    anchors, seen = set(), {}
    for line in prose(read(path)).split("\n"):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower().replace("`", "")).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_relative_links_resolve():
    checked, broken = 0, []
    for path in DOCS:
        text = INLINE_CODE.sub("", prose(read(path)))
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            checked += 1
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.name}: ({target}): no such file")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
                broken.append(f"{path.name}: ({target}): no heading #{anchor} in {linked.name}")
    assert not broken, "\n".join(broken)
    assert checked > 20


def module_file(dotted: str) -> pathlib.Path | None:
    """The source file of a module of this repository named by its dotted name, or None."""
    path = ROOT.joinpath(*dotted.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def defined_names(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """Names a module or class body defines: functions, classes, assignments and imports."""
    names = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update({n.id: node for n in ast.walk(target) if isinstance(n, ast.Name)})
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update({(a.asname or a.name).split(".")[0]: node for a in node.names})
    return names


def resolves(dotted: str) -> bool:
    """`pkg.module[.name[.attribute]]` names a module of the repository, a name it defines and, for a class, one of
    its attributes (read from the source: nothing is imported)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        path = module_file(".".join(parts[:cut]))
        if path is None:
            continue
        rest = parts[cut:]
        if not rest:
            return True
        names = defined_names(ast.parse(path.read_text(encoding="utf-8")).body)
        node = names.get(rest[0])
        if node is None:
            return module_file(".".join(parts[:cut + 1])) is not None
        if len(rest) > 1 and isinstance(node, ast.ClassDef):
            return rest[1] in defined_names(node.body)
        return True
    return False


def test_named_files_and_modules_exist():
    """Repository paths (`llama2_jax/model/lora.py`, `benchmarks/eval.py`) and dotted names
    (`llama2_jax.inference.decode.sample`) in the docs point at something that exists."""
    missing = []
    for path in DOCS:
        text = read(path)
        for name in set(REPO_PATH.findall(text)):
            placeholder = re.search(r"[*<>]", name) or re.search(r"/[A-Z]+\.\w+$", name)
            if not placeholder and not (ROOT / name.rstrip(".")).exists():
                missing.append(f"{path.name}: {name} does not exist")
        for name in set(DOTTED_NAME.findall(text)):
            if not resolves(name):
                missing.append(f"{path.name}: {name} names no module or definition of this repository")
    assert not missing, "\n".join(sorted(missing))


# ------------------------------------------------------------------------------------------------------- README


def readme_shell_blocks() -> list[tuple[str, int]]:
    """(body, line number where the block ends) of the README's shell code blocks."""
    text = read(ROOT / "README.md")
    return [(m.group(2), text[:m.end()].count("\n") + 1) for m in FENCE.finditer(text)
            if m.group(1).lower() in SHELL_LANGS]


def ci_commands() -> list[list[str]]:
    """The install and test commands of .ci/run (`pip install ...`, `python -m pytest ...`), pip's -q dropped."""
    commands = []
    for line in read(ROOT / ".ci" / "run").split("\n"):
        tokens = shlex.split(line, comments=True)
        if tokens[:2] == ["pip", "install"] or tokens[:3] == ["python", "-m", "pytest"]:
            commands.append([t for t in tokens if not (t == "-q" and tokens[0] == "pip")])
    return commands


def test_readme_is_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/"


def test_readme_fresh_machine_commands():
    (train, train_end), (tests, tests_end) = readme_shell_blocks()[:2]
    assert max(train_end, tests_end) <= FIRST_SCREEN_LINES, "the two commands belong on the README's first screen"

    train_commands = split_commands(train, "README.md")
    assert train_commands[0] == ["python3", "-m", "venv", ".venv"]
    assert ["pip", "install", "-e", "."] in train_commands  # the base install: no extra
    pretrain = [c for c in train_commands if python_module(c) == "train.pretrain"]
    assert len(pretrain) == 1 and command_config(pretrain[0]) == "configs/tiny.py"
    assert load_config("configs/tiny.py").data.source == "default"  # the embedded corpus: offline

    readme = [[t for t in c if not (t == "-q" and c[0] == "pip")] for c in split_commands(tests, "README.md")]
    assert readme[0] == ["python3", "-m", "venv", ".venv"]
    ci = ci_commands()
    assert len(ci) == 3, ci  # torch, the project with its extras, pytest
    for command in ci:
        assert command in readme, f".ci/run runs {' '.join(command)!r}; the README's test command does not"
    assert readme[-1] == ci[-1], "the README's test command ends with .ci/run's pytest command"
