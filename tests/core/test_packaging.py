"""Packaging and reference docs: typed options in step with Options, the reference
generator runs, the sdist manifest carries what the README links."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from gradwatch._typing import WatchOptions
from gradwatch.options import Options

ROOT = Path(__file__).resolve().parents[2]


def test_watch_options_typeddict_names_every_option():
    fields = {f.name for f in dataclasses.fields(Options)} - {"max_norm_given"}
    assert set(WatchOptions.__annotations__) == fields
    assert WatchOptions.__total__ is False


def test_reference_generator_runs_and_documents_every_option(tmp_path):
    out = tmp_path / "reference.md"
    res = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_reference.py"), str(out)], capture_output=True,
                         text=True, timeout=120, check=False, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    for f in dataclasses.fields(Options):
        if f.name != "max_norm_given":
            assert f"| `{f.name}` |" in text
    for heading in ("## Attaching", "## The watch", "## Records and events", "## Policies", "## Errors", "## Command line"):
        assert heading in text
    assert "watch.latest_profile" in text and "gradwatch.AutoClip(percentile" in text


def test_manifest_and_license_are_in_place():
    manifest = (ROOT / "MANIFEST.in").read_text()
    for needed in ("LICENSE", "CHANGELOG.md", "recursive-include examples", "recursive-include docs"):
        assert needed in manifest
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = "Apache-2.0"' in pyproject and 'license-files = ["LICENSE"]' in pyproject
    readme = (ROOT / "README.md").read_text()
    assert "docs/reference.md" in readme and (ROOT / "docs" / "reference.md").exists()
