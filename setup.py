"""The wheel's packages: fedsim, and the repository's root folders mapped into its namespace.

The folders stay at the root (attacks/, defenses/, experiments/, conf/); installed they are fedsim.attacks,
fedsim.defenses, fedsim.experiments and fedsim.conf (YAML as package data). The mapping is fedsim's own
`CHECKOUT_FOLDERS` (fedsim/__init__.py), which also gives a checkout the same names; everything else is in
pyproject.toml.
"""

import ast
from pathlib import Path

from setuptools import find_namespace_packages, find_packages, setup

ROOT = Path(__file__).resolve().parent


def checkout_folders() -> dict[str, str]:
    tree = ast.parse((ROOT / "fedsim" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CHECKOUT_FOLDERS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit("fedsim/__init__.py defines no CHECKOUT_FOLDERS")


FOLDERS = checkout_folders()
packages = find_packages(where=str(ROOT), include=["fedsim", "fedsim.*"])
packages += find_namespace_packages(where=str(ROOT), include=["hydra_plugins.*"])  # Hydra's plugin namespace
for name, folder in FOLDERS.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(where=str(ROOT / folder))]

setup(
    packages=sorted(set(packages)),
    package_dir={"": ".", **FOLDERS},
    package_data={"fedsim.conf": ["*.yaml", "**/*.yaml"]},
    include_package_data=False,
)
