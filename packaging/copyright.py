"""Writes a package's copyright file: vibectld's own license and every bundled distribution.

Usage: copyright.py PACKAGE PREFIX SITE_PACKAGES  (the text goes to stdout)

Run by scripts/build-packages with the distribution's python3.11 on the staged virtualenv;
it reads only the installed distributions' metadata.
"""

from __future__ import annotations

import sys
from importlib.metadata import Distribution, distributions
from pathlib import Path

CHANGELOG = Path(__file__).with_name("changelog.yaml")

HEADER = """\
{package}: vibectld and vibectl, a central LLM proxy and its command-line client.

Copyright: {holder}
Contact: {identity}
License: Apache-2.0

On Debian systems the full text of the Apache License, Version 2.0, is in
/usr/share/common-licenses/Apache-2.0.

The package bundles a Python virtual environment in {prefix}. Its third-party
distributions, with the licenses their metadata declares, are listed below; each
one's license text is in its .dist-info directory under
{site}.

"""


def project_identity(changelog: Path = CHANGELOG) -> str:
    """The packager of the newest changelog entry ("Name <address>"), read as
    scripts/build-packages reads it for the packages' Maintainer and Packager."""
    for line in changelog.read_text(encoding="utf-8").splitlines():
        if line.startswith("  packager: "):
            return line.removeprefix("  packager: ").strip()
    raise SystemExit(f"no packager in {changelog}")


def header(package: str, prefix: str) -> str:
    identity = project_identity()
    return HEADER.format(
        package=package,
        prefix=prefix,
        site=f"{prefix}/lib/python3.11/site-packages",
        holder=identity.split("<", 1)[0].strip(),
        identity=identity,
    )


def license_of(dist: Distribution) -> str:
    """The distribution's license, from the most precise metadata field it has."""
    meta = dist.metadata
    expression = meta.get_all("License-Expression")
    if expression:
        return str(expression[0])
    classifiers = [
        str(c).rsplit(" :: ", 1)[-1]
        for c in meta.get_all("Classifier") or []
        if str(c).startswith("License :: ") and str(c) != "License :: OSI Approved"
    ]
    if classifiers:
        return " / ".join(classifiers)
    text = str((meta.get_all("License") or [""])[0]).strip()
    # Some distributions put the whole license text in this field.
    if text and "\n" not in text and len(text) <= 60:
        return text
    return "see its license file"


def main(package: str, prefix: str, site_packages: Path) -> None:
    out = [header(package, prefix)]
    rows = sorted(
        (str(d.metadata["Name"]), d.version, license_of(d))
        for d in distributions(path=[str(site_packages)])
        if str(d.metadata["Name"]) != "vibectld"
    )
    width = max(len(f"{name} {version}") for name, version, _ in rows)
    for name, version, lic in rows:
        out.append(f"  {f'{name} {version}':<{width}}  {lic}\n")
    sys.stdout.write("".join(out))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: copyright.py PACKAGE PREFIX SITE_PACKAGES")
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
