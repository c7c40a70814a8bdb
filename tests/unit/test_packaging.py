"""The package as pip installs it: every module directory is a package in setup.cfg.

A directory of modules that ``packages`` does not list is left out of the
wheel or installed only through ``package_data``, which setuptools warns
about at length on every ``pip install`` (it did for the migrations).
"""

import configparser
import pathlib

import setuptools

REPO = pathlib.Path(__file__).resolve().parents[2]


def setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def declared_packages():
    cfg = setup_cfg()
    assert cfg["options"]["packages"].strip() == "find:"
    include = [p.strip() for p in cfg["options.packages.find"]["include"].split(",")]
    return set(setuptools.find_packages(where=str(REPO), include=include))


def test_every_directory_of_modules_is_a_package():
    packages = declared_packages()
    for directory in sorted((REPO / "compute_agent").rglob("*")):
        if directory.is_dir() and directory.name != "__pycache__" and any(directory.glob("*.py")):
            name = ".".join(directory.relative_to(REPO).parts)
            assert name in packages, f"{name} has modules but is not a package (no __init__.py?)"
    assert "compute_agent.db.migrations.versions" in packages


def test_package_data_names_files_that_exist_in_a_package():
    packages = declared_packages()
    for package, patterns in setup_cfg()["options.package_data"].items():
        assert package in packages, package
        base = REPO.joinpath(*package.split("."))
        for pattern in (p.strip() for p in patterns.split(",")):
            assert "/" not in pattern, f"{pattern}: a file of a subpackage, not of {package}"
            assert list(base.glob(pattern)), f"{package}: nothing matches {pattern}"


def test_alembic_finds_the_revisions_beside_the_package_marker():
    from compute_agent.db import migration

    assert migration.head_revision() == "0003"
