"""The package installs with pip and works away from the checkout; the house rules hold."""

import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("cagem-train", "cagem-evaluate", "cagem-export", "cagem-sample", "cagem-classify")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install --target` of the checkout into a temporary folder (not this environment)."""
    pytest.importorskip("setuptools")
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                             "--no-build-isolation", "--target", str(target), ROOT],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return target


def _env(target):
    return dict(os.environ, PYTHONPATH=str(target), TF_CPP_MIN_LOG_LEVEL="")


@pytest.mark.e2e  # pip-installs the package / starts the programs
def test_installed_package_imports_from_another_directory(installed, tmp_path):
    code = ("import cagem_tf, sys; from cagem_tf import CaGeM, Config; "
            "print(cagem_tf.__file__); print(CaGeM.__name__, Config().epochs)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(installed),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    path, names = result.stdout.splitlines()[-2:]
    assert path.startswith(str(installed)) and names == "CaGeM 1000"


@pytest.mark.e2e  # pip-installs the package / starts the programs
@pytest.mark.parametrize("script", SCRIPTS)
def test_console_scripts_answer_help_without_tensorflow_log_lines(installed, tmp_path, script):
    result = subprocess.run([str(installed / "bin" / script), "--help"], cwd=tmp_path,
                            env=_env(installed), capture_output=True, text=True, timeout=300)
    # absl ends --help with exit status 1 after printing the usage.
    assert script in result.stdout, result.stderr[-3000:]
    assert "--model_dir" in result.stdout or "--saved_model" in result.stdout
    first = (result.stdout + result.stderr).lstrip().splitlines()[0]
    assert "oneDNN" not in first and "cuda" not in first.lower(), first


@pytest.mark.e2e  # pip-installs the package / starts the programs
def test_help_lists_the_thread_flags_of_the_training_program():
    result = subprocess.run([sys.executable, "train/main.py", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    for flag in ("--intra_op_threads", "--labels", "--pseudo_labels"):
        assert flag in result.stdout


def _python_files(*folders):
    for folder in folders:
        for base, _, names in os.walk(os.path.join(ROOT, folder)):
            yield from (os.path.join(base, n) for n in names if n.endswith(".py"))


def test_no_sys_path_edits_and_tests_import_only_the_library():
    for path in _python_files("cagem_tf", "train", "export", "experiments", "bench", "tests"):
        if path != os.path.abspath(__file__):
            assert "sys" + ".path" not in open(path).read(), path
    for path in _python_files("tests"):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] not in ("train", "export", "bench",
                                                         "experiments"), (path, node.module)


def test_the_library_never_imports_a_program():
    for path in _python_files("cagem_tf"):
        for node in ast.walk(ast.parse(open(path).read())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in ("train", "export", "bench", "experiments"), \
                    (path, name)


def test_each_module_imports_only_the_modules_above_it_in_docs_architecture():
    table = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    layers = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert len(layers) >= 15 and "files" in layers and layers[-1] == "cli"
    rank = {name: i for i, name in enumerate(layers)}
    for path in _python_files("cagem_tf"):
        parts = os.path.relpath(path, os.path.join(ROOT, "cagem_tf")).split(os.sep)
        mine = os.path.splitext(parts[0])[0]
        if mine == "__init__":
            continue
        assert mine in rank, f"{mine} is not in docs/architecture.md's table"
        for node in ast.walk(ast.parse(open(path).read())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("cagem_tf"):
                names = [node.module.split(".")[1]] if "." in node.module else \
                    [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names
                         if a.name.startswith("cagem_tf.")]
            for name in names:
                if name == "CaGeM":  # the package's export of model.CaGeM
                    name = "model"
                if name != mine:
                    assert rank[name] < rank[mine], f"{path} imports {name}, which is not above it"


def test_every_error_of_the_library_is_a_user_error_the_programs_catch():
    import importlib
    import pkgutil

    import cagem_tf
    from cagem_tf.files import UserError
    errors = {}
    for info in pkgutil.walk_packages(cagem_tf.__path__, "cagem_tf."):
        if info.name.startswith("cagem_tf.cli"):  # the programs define flags when imported
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, type) and issubclass(value, Exception) and \
                    value.__module__ == info.name:
                errors[f"{info.name}.{name}"] = value
    assert len(errors) >= 7, errors
    assert [name for name, error in errors.items() if not issubclass(error, UserError)] == []
    # The programs catch the base class only: a new error class needs no edit there.
    for program in ("train", "evaluate", "export", "classify"):
        source = open(os.path.join(ROOT, "cagem_tf", "cli", f"{program}.py")).read()
        assert "UserError as e" in source, program
