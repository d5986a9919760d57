"""Packaging: batchloop without a system libpq, the sdist's contents, the version, root notes."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import batchloop
from batchloop import cli, demo

ROOT = Path(__file__).resolve().parent.parent
INSTALL = "pip install 'batchloop[psycopg]'"

# Makes libpq unloadable for Python: psycopg's pure-Python implementation finds it with
# ctypes.util.find_library and loads it with ctypes; both now fail as on a machine without it.
NO_LIBPQ = textwrap.dedent(
    """
    import ctypes
    import ctypes.util

    _find_library = ctypes.util.find_library


    def _hidden(name):
        base = str(name).rsplit("/", 1)[-1]
        return base == "pq" or base.startswith("libpq")


    def find_library(name):
        return None if _hidden(name) else _find_library(name)


    ctypes.util.find_library = find_library
    _init = ctypes.CDLL.__init__


    def _cdll_init(self, name, *args, **kwargs):
        if name is not None and _hidden(name):
            raise OSError(f"{name}: cannot open shared object file (hidden by the test)")
        _init(self, name, *args, **kwargs)


    ctypes.CDLL.__init__ = _cdll_init
    """
)


# ---------------------------------------------------------------- no libpq (issue 8, item 9)


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A fresh venv with only the README's first install (``-e '.[embedded]'``), and an
    environment in which its Python cannot load libpq."""
    base = tmp_path_factory.mktemp("bare")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    shim = base / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(NO_LIBPQ, encoding="utf-8")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PSYCOPG_IMPL", "DATABASE_URL", "BATCHLOOP_DSN")
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-e", f"{ROOT}[embedded]"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr
    yield venv, {**env, "PYTHONPATH": str(shim)}


def _run(venv: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=venv.parent,  # not the checkout: nothing imported from the source tree by accident
    )


@pytest.mark.slow
def test_without_libpq_import_demo_and_asyncpg_work(
    bare_venv: tuple[Path, dict[str, str]], dsn: str
) -> None:
    venv, env = bare_venv
    # The environment really has no usable psycopg (else this test would prove nothing).
    probe = _run(venv, env, "python", "-c", "import psycopg")
    assert probe.returncode != 0 and "libpq" in probe.stderr, probe.stderr

    imported = _run(
        venv,
        env,
        "python",
        "-c",
        "import batchloop, batchloop.sync, batchloop.cli, batchloop.demo; "
        "print(batchloop.__version__)",
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == batchloop.__version__

    ran = _run(
        venv,
        env,
        "batchloop",
        "--dsn",
        dsn,
        "demo",
        "--events",
        "400",
        "--producers",
        "2",
        "--batch",
        "50",
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "final status:" in ran.stdout and "OK" in ran.stdout


@pytest.mark.slow
def test_without_libpq_psycopg_features_name_the_install_command(
    bare_venv: tuple[Path, dict[str, str]], dsn: str
) -> None:
    venv, env = bare_venv
    script = textwrap.dedent(
        f"""
        import batchloop as bl
        import batchloop.sync as bls

        for label, call in (
            ("host", lambda: bl.Host({dsn!r}, driver="psycopg")),
            ("sync", lambda: bls.connect({dsn!r})),
            ("status", lambda: bls.status(object(), "x")),
        ):
            try:
                call()
            except ImportError as exc:
                assert isinstance(exc, bl.BatchloopError), type(exc)
                print(label, exc)
            else:
                raise SystemExit(label + " did not fail")
        """
    )
    done = _run(venv, env, "python", "-c", script)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["host", "sync", "status"]
    for line in lines:
        assert INSTALL in line and "libpq" in line, line

    status = _run(venv, env, "batchloop", "--dsn", dsn, "status")
    assert status.returncode == 1
    assert INSTALL in status.stderr and "Traceback" not in status.stderr, status.stderr


@pytest.mark.slow
def test_the_psycopg_extra_brings_a_working_psycopg(
    bare_venv: tuple[Path, dict[str, str]], migrated_dsn: str
) -> None:
    venv, env = bare_venv
    pip = _run(venv, env, "python", "-m", "pip", "install", "-q", "-e", f"{ROOT}[embedded,psycopg]")
    assert pip.returncode == 0, pip.stderr
    try:
        done = _run(venv, env, "batchloop", "--dsn", migrated_dsn, "status", "--json")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "[]"
    finally:  # the venv is shared: the other tests need it without a working psycopg
        _run(venv, env, "python", "-m", "pip", "uninstall", "-q", "-y", "psycopg-binary")


def test_psycopg_features_fail_clearly_when_psycopg_cannot_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same in-process, with psycopg made unavailable to the compatibility module."""
    import batchloop.sync as bls
    from batchloop.drivers import _psycopg

    monkeypatch.setattr(_psycopg, "psycopg", None)
    monkeypatch.setattr(
        _psycopg,
        "_error",
        ImportError(
            "no pq wrapper available.\nAttempts made:\n"
            "- couldn't import psycopg 'python' implementation: libpq library not found"
        ),
    )
    for call in (
        lambda: batchloop.Host("postgresql:///x", driver="psycopg"),
        lambda: bls.connect("postgresql:///x"),
        lambda: bls.stop(object(), "x"),  # type: ignore[arg-type]
    ):
        with pytest.raises(_psycopg.PsycopgUnavailable) as caught:
            call()
        message = str(caught.value)
        assert INSTALL in message and "libpq library not found" in message
        assert "\n" not in message
    assert not _psycopg.socket_gone(OSError())
    # An asyncpg host is still fine.
    assert batchloop.Host("postgresql:///x").driver == "asyncpg"


# ---------------------------------------------------------------- sdist (item 10)


def _copy_tree(dest: Path) -> None:
    skip = {
        ".git",
        ".venv",
        "venv",
        ".ci",
        "build",
        "dist",
        ".mypy_cache",
        ".ruff_cache",
        ".pytest_cache",
        ".hypothesis",
        "__pycache__",
    }
    shutil.copytree(ROOT, dest, ignore=lambda _d, names: [n for n in names if n in skip])


def test_sdist_has_the_project_and_nothing_from_a_virtualenv(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    _copy_tree(tree)
    # Virtualenvs under names .gitignore does not list: their packages have tests/ dirs, and
    # an editable install may leave a batchloop/ dir in them.
    for stray in (
        "venv/lib/python3.11/site-packages/somepkg/tests/test_x.py",
        "env/lib/python3.11/site-packages/batchloop/__init__.py",
        "examples/.venv/lib/python3.11/site-packages/x/tests/test_y.py",
    ):
        (tree / stray).parent.mkdir(parents=True, exist_ok=True)
        (tree / stray).write_text("", encoding="utf-8")
    out = tmp_path / "out"
    built = subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "sdist", "-d", str(out)],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (sdist,) = out.glob("batchloop-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
        prefix = tar.getnames()[0].split("/", 1)[0]
        pkg_info = tar.extractfile(f"{prefix}/PKG-INFO")
        assert pkg_info is not None
        metadata = pkg_info.read().decode()
    for wanted in (
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "batchloop/__init__.py",
        "batchloop/drivers/_psycopg.py",
        "batchloop/sql/queries.sql",
        "batchloop/sql/schema.sql",
        "migrations/0001_init.sql",
        "tests/conftest.py",
        "tests/test_packaging.py",
        "examples/quickstart.py",
        "bench/drain.py",
        "docs/benchmarks.md",
    ):
        assert wanted in names, f"{wanted} missing from the sdist"
    strays = [n for n in names if "site-packages" in n or "venv/" in n or "__pycache__" in n]
    assert strays == []
    assert {n.split("/", 1)[0] for n in names} <= {
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "PKG-INFO",
        "batchloop",
        "migrations",
        "tests",
        "examples",
        "bench",
        "docs",
        "mkdocs.yml",
        ".gitignore",
    }
    assert "Classifier: Programming Language :: Python :: 3.10" in metadata
    assert "Project-URL: Repository, https://github.com/batchloop/batchloop" in metadata
    assert "Requires-Dist: exceptiongroup" in metadata and "python_version < '3.11'" in metadata
    assert "Provides-Extra: psycopg" in metadata


def test_license_file_is_mit() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "batchloop contributors" in text


# ---------------------------------------------------------------- version (item 10)


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    assert batchloop.__version__ == importlib.metadata.version("batchloop")
    assert "__version__" in batchloop.__all__
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"batchloop {batchloop.__version__}"


# ---------------------------------------------------------------- root (item 11)


def test_demo_says_it_creates_a_system_user_when_root(monkeypatch: pytest.MonkeyPatch) -> None:
    import pwd

    monkeypatch.setattr(os, "geteuid", lambda: 0)

    def no_user(name: str) -> pwd.struct_passwd:
        assert name == "pgserver"
        raise KeyError(name)

    monkeypatch.setattr(pwd, "getpwnam", no_user)
    note = demo.root_note()
    assert note is not None and "'pgserver'" in note and "useradd" in note

    monkeypatch.setattr(pwd, "getpwnam", lambda name: object())
    note = demo.root_note()
    assert note is not None and "existing system user 'pgserver'" in note

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert demo.root_note() is None


def test_readme_says_the_embedded_server_creates_a_user_as_root() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "root" in quick_start and "`pgserver`" in quick_start
    assert INSTALL in quick_start
