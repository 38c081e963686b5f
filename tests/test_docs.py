"""The README and docs/ are true: every Python block runs, every command names real scripts and flags, and the
API reference builds from the docstrings without a warning.

Each page's Python blocks run in order in one fresh process (a page's blocks build on each other), in a
temporary folder. The dated records in docs/experiments/ keep the commands of their time and are not run.
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md"))
# Pages whose Python blocks train for more than a few seconds: they run with the slow tests.
TRAINING_PAGES = {"README.md", "getting_started.md", "search.md", "export.md", "scale.md", "latency.md",
                  "architecture_search.md"}


def _blocks(page: pathlib.Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), re.S | re.M)


def _name(page: pathlib.Path) -> str:
    return page.name


def test_every_page_is_found_and_has_only_known_block_languages():
    assert {p.name for p in PAGES} >= {"README.md", "getting_started.md", "search_space.md", "search.md",
                                       "formats.md", "export.md", "scale.md", "benchmarks.md", "design.md"}
    for page in PAGES:
        languages = set(re.findall(r"^```(\w*)$", page.read_text(), re.M)) - {""}
        assert languages <= {"python", "bash", "text"}, (page.name, languages)


def _run_python(page: pathlib.Path, tmp_path: pathlib.Path):
    blocks = _blocks(page, "python")
    assert blocks, f"{page.name} has no Python block"
    # A block that chooses its own Keras backend runs in a process of its own; the others together.
    alone = [b for b in blocks if 'os.environ["KERAS_BACKEND"]' in b]
    together = [b for b in blocks if b not in alone]
    for number, code in enumerate(["\n\n".join(together)] * bool(together) + alone):
        script = tmp_path / f"page{number}.py"
        script.write_text(code)
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900,
                                cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "KERAS_BACKEND": "tensorflow"})
        assert result.returncode == 0, f"{page.name}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


@pytest.mark.parametrize("page", [p for p in PAGES if p.name not in TRAINING_PAGES and _blocks(p, "python")],
                         ids=_name)
def test_python_blocks_run(page, tmp_path):
    _run_python(page, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if p.name in TRAINING_PAGES], ids=_name)
def test_python_blocks_that_train_run(page, tmp_path):
    _run_python(page, tmp_path)


def _defined_flags(script: pathlib.Path) -> set[str]:
    text = script.read_text()
    if script.name == "__main__.py":
        text += "".join(p.read_text() for p in script.parent.glob("*.py"))
    # A benchmark that imports another one's helpers takes its flags too.
    text += "".join((ROOT / "benchmarks" / f"{name}.py").read_text()
                    for name in re.findall(r"^from benchmarks import (\w+)", text, re.M))
    names = set(re.findall(r'flags\.DEFINE_\w+\(\s*"(\w+)"', text))
    booleans = set(re.findall(r'flags\.DEFINE_bool\(\s*"(\w+)"', text))
    # absl's own flags, and the negated form of every boolean.
    return names | {f"no{name}" for name in booleans} | {"helpfull", "help", "verbosity", "v"}


def _commands(block: str) -> list[list[str]]:
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line.split(" #")[0]) for line in joined.splitlines() if line.strip()]


def _extras() -> set[str]:
    setup = (ROOT / "setup.py").read_text()
    return set(re.findall(r'^\s+"(\w+)": \[', setup, re.M))


def _check_command(words: list[str], page: str):
    scripts = {"scripts/main.sh": ROOT / "examples" / "search.py", "scripts/test.sh": None}
    if words[:2] == ["pip", "install"]:
        extras = re.search(r"\[([\w,]+)\]", " ".join(words))
        assert extras and set(extras.group(1).split(",")) <= _extras(), (page, words)
        return
    if words[0] == "bash":
        assert (ROOT / words[1]).exists(), (page, words)
        script, flags = scripts.get(words[1]), words[2:]
        if script is None:
            return
    elif words[0].endswith("python") or words[0] == "KERAS_BACKEND=jax":
        words = words[1:] if words[0] == "KERAS_BACKEND=jax" else words
        if words[1] == "-m":
            assert words[2] in ("benchmarks.pareto", "sphinx", "pytest"), (page, words)
            if words[2] != "benchmarks.pareto":
                return
            script, flags = ROOT / "benchmarks" / "pareto" / "__main__.py", words[3:]
        else:
            script, flags = ROOT / words[1], words[2:]
        assert script.exists(), (page, words)
    else:
        pytest.fail(f"{page}: a command the test does not know how to check: {words}")
    known = _defined_flags(script)
    for flag in flags:
        if flag.startswith("-"):
            name = flag.lstrip("-").split("=")[0]
            assert name in known, f"{page}: {script.name} has no flag --{name}"
            value = flag.partition("=")[2]
            if value.startswith("benchmarks/") or value.startswith("docs/"):
                assert (ROOT / value).exists(), (page, flag)


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p, "bash")], ids=_name)
def test_commands_name_real_scripts_and_flags(page):
    for block in _blocks(page, "bash"):
        for words in _commands(block):
            _check_command(words, page.name)


def test_links_between_pages_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_the_api_reference_builds_without_a_warning(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs" / "api"),
         str(tmp_path / "html")], capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    assert result.returncode == 0 and "WARNING" not in result.stderr and "ERROR" not in result.stderr, \
        result.stderr[-4000:]
    index = (tmp_path / "html" / "index.html").read_text()
    for name in ("fliqs_keras.apply", "FliqsSearch", "SearchConfig", "to_tflite", "fake_quant", "CostModel"):
        assert name in index, name
