"""sparsekit as users install it: build the wheel, check that it holds every file the package reads,
install it into a fresh virtual environment and run the CLI there from a folder outside the checkout:
an offline prune, an offline zero-shot evaluation of what it saved, and the whole CLI error surface
(tests/cli_errors.py). The checkout itself is installed editable, which hides a file missing from
the wheel; this test is where such a file shows.

The fresh environment holds only the wheel (``pip install --target``); the third-party packages it
needs (torch, transformers, lm-eval, the offline model and corpus) come from this test's own
environment through a path file placed after it, so nothing is downloaded. The checkout is on no
path there: ``import sparsekit`` must resolve to the installed wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.cli_errors import CASES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sparsekit"
_BYTECODE = (".pyc", ".pyo", ".so")


def package_files() -> set[str]:
    """Every file of the package tree (modules and data), as paths inside the wheel."""
    return {
        p.relative_to(ROOT).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in _BYTECODE
    }


def data_files_the_code_opens() -> set[str]:
    """The data files behind the paths the code builds from ``__file__``: task YAMLs, shape tables,
    the C++ source of the CPU kernel."""
    from sparsekit.bench.layers import SHAPES_DIR
    from sparsekit.eval.zero_shot import TASKS_DIR
    from sparsekit.kernels.sparse24_cpu import CPP_SOURCE

    files = [*TASKS_DIR.glob("*.yaml"), *SHAPES_DIR.glob("*.json"), CPP_SOURCE]
    return {Path(f).resolve().relative_to(ROOT).as_posix() for f in files}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the package (the checkout gets no build/ or egg-info)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    shutil.copytree(PACKAGE, src / "sparsekit", ignore=shutil.ignore_patterns("__pycache__", *_BYTECODE))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    subprocess.run([*build, "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True, text=True)
    (built,) = (tmp / "dist").glob("sparsekit-*.whl")
    return built


def test_the_wheel_holds_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    opened = data_files_the_code_opens()
    assert any(name.endswith(".yaml") for name in opened)  # the offline tasks are among them
    missing = sorted((package_files() | opened) - names)
    assert not missing, f"the wheel leaves out {missing}: list them in [tool.setuptools.package-data]"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "sparsekit = sparsekit.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    """A fresh venv with the wheel installed; returns its python, the sparsekit script, a clean
    environment and a working folder outside the checkout."""
    tmp = tmp_path_factory.mktemp("installed")
    venv, target, work = tmp / "venv", tmp / "site", tmp / "elsewhere"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site, "sparsekit_wheel_test.pth").write_text("\n".join([str(target), *ours]) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}
    pip = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target)]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True, text=True, env=env, cwd=work)
    return {
        "python": python,
        "sparsekit": target / "bin" / "sparsekit",
        "env": env,
        "cwd": work,
        "root": target,
    }


def _run(installed: dict, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        env=installed["env"],
        cwd=installed["cwd"],
        timeout=timeout,
    )


_WHERE = """
import sys, sparsekit, sparsekit.cli
editable = [f for f in sys.meta_path if "editable" in repr(f).lower()]
print(sparsekit.__file__, sparsekit.cli.__file__, len(editable), any("{root}" == p for p in sys.path))
"""


def test_the_installed_package_is_the_wheel_not_the_checkout(installed):
    done = _run(installed, installed["python"], "-c", _WHERE.replace("{root}", str(ROOT)))
    assert done.returncode == 0, done.stderr
    init, cli, editable, checkout_on_path = done.stdout.split()
    assert init.startswith(str(installed["root"])) and cli.startswith(str(installed["root"]))
    assert editable == "0" and checkout_on_path == "False"


def test_an_offline_prune_and_zero_shot_evaluation_from_the_installed_wheel(installed, tmp_path):
    """The README's flow on a tiny model: prune with the offline corpus and save compressed, then
    evaluate the checkpoint on the shipped offline task, from a folder outside the checkout."""
    pytest.importorskip(
        "lm_eval", reason="lm-eval is the optional extra sparsekit[eval]; make setup installs it"
    )
    from tests.tiny_folder import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "pruned"
    sparsekit = installed["sparsekit"]
    argv = [
        "prune",
        model,
        "--sparsity",
        "2:4",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--device",
        "cpu",
        "--out",
        out,
    ]
    pruned = _run(installed, sparsekit, *argv)
    assert pruned.returncode == 0, pruned.stderr[-3000:]
    assert "pruned 14 linear layers with wanda" in pruned.stdout and (out / "prune_report.json").is_file()
    evaluated = _run(
        installed, sparsekit, "eval", out, "--tasks", "wiki_lambada", "--limit", "5", "--device", "cpu"
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "| wiki_lambada | acc |" in evaluated.stdout and "5 of" in evaluated.stdout


_ERRORS = """
import contextlib, io, json, sys
from sparsekit import cli

def refuse(*args, **kwargs):
    raise AssertionError("the model was loaded before the argument check")

cli.load_any = refuse
cases, paths = json.load(open(sys.argv[1])), json.loads(sys.argv[2])
failed = []
for argv, message in cases:
    argv = [a.format(**paths) for a in argv]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(argv)
    if code != 2 or message not in err.getvalue() or "Traceback" in err.getvalue():
        failed.append([argv, code, message, err.getvalue()[-500:]])
print(json.dumps(failed))
"""


def test_the_cli_error_surface_from_the_installed_wheel(installed, tmp_path):
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "empty").mkdir()
    paths = {"bin": str(tmp_path / "bin.txt"), "tmp": str(tmp_path / "empty")}
    (tmp_path / "cases.json").write_text(json.dumps(CASES))
    done = _run(installed, installed["python"], "-c", _ERRORS, tmp_path / "cases.json", json.dumps(paths))
    assert done.returncode == 0, done.stderr[-3000:]
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failed, failed
