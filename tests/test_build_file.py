"""The BUILD file names every module, script and test of the package."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD = (ROOT / "BUILD").read_text()


def _listed_sources():
    return set(re.findall(r'"((?:fliqs_keras|examples|benchmarks)/[\w/]+\.py)"', BUILD))


def test_every_module_script_and_benchmark_is_in_build():
    on_disk = {
        str(path.relative_to(ROOT))
        for folder in ("fliqs_keras", "examples", "benchmarks")
        for path in (ROOT / folder).rglob("*.py")
    }
    assert on_disk - _listed_sources() == set(), "add these to BUILD"


def test_every_build_source_exists():
    missing = {path for path in _listed_sources() if not (ROOT / path).exists()}
    assert missing == set(), "BUILD lists files that do not exist"


def test_every_test_file_has_a_py_test():
    block = re.search(r"for name in \[(.*?)\]", BUILD, re.S).group(1)
    targets = set(re.findall(r'"(test_\w+)"', block))
    on_disk = {path.stem for path in (ROOT / "tests").glob("test_*.py")}
    assert targets == on_disk
