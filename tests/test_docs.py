"""The documentation against the code: the generated config reference, the README's size and
index, and every relative link of README.md, BENCHMARKS.md and docs/*.md."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from data_pipelines.config import DataConfig as PipelineConfig
from pfc_ds.train import config, config_doc

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 200
PAGES = [README, ROOT / "BENCHMARKS.md", *sorted(DOCS.glob("*.md"))]
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(path: Path) -> list[str]:
    """The link targets of a markdown file, outside code blocks and code spans."""
    text = _CODE.sub("", _FENCE.sub("", path.read_text()))
    return _LINK.findall(text)


def yaml_keys() -> set[str]:
    """Every YAML key, read from the dataclasses themselves (not from the generator)."""
    keys = set()
    for section in dataclasses.fields(config.Config):
        cls = section.default_factory
        for f in dataclasses.fields(cls):
            if cls is config.DataSection and f.name == config_doc.PIPELINE_FIELD:
                continue
            keys.add(f"{section.name}.{f.name}")
    keys |= {f"data.{f.name}" for f in dataclasses.fields(PipelineConfig)}
    return keys


def test_config_md_is_generated_from_the_dataclasses():
    text = (DOCS / "config.md").read_text()
    assert text == config_doc.render(), (
        f"docs/config.md is stale: run `{config_doc.COMMAND}` and commit the result"
    )


def test_every_config_key_is_documented():
    entries = {e.key: e for e in config_doc.entries()}
    assert set(entries) == yaml_keys()
    undocumented = sorted(k for k, e in entries.items() if not e.doc.strip())
    assert not undocumented, (
        f"no description for {undocumented}: add a comment beside the field in its dataclass"
    )


def test_notes_name_keys_the_source_leaves_uncommented():
    entries = {e.key: e for e in config_doc.entries()}
    stale = sorted(set(config_doc.NOTES) - set(entries))
    assert not stale, f"config_doc.NOTES names keys that do not exist: {stale}"
    redundant = sorted(k for k in config_doc.NOTES if entries[k].from_source)
    assert not redundant, (
        f"{redundant} now have a comment in the source: remove their config_doc.NOTES entries"
    )


def test_validated_choices_are_listed():
    entries = {e.key: e for e in config_doc.entries()}
    assert entries["head.bank"].allowed == "one of `device`, `host`, `disk`"
    assert entries["optim.name"].allowed == "one of `sgd`, `adamw`"
    assert entries["data.decoder"].allowed == "one of `dali`, `nvimgcodec`"
    assert entries["train.rollback_lr_factor"].allowed == "in (0, 1]"
    assert entries["head.sample_rate"].allowed == "in [0, 1]"
    assert entries["data.cache_dir"].default == "~/.cache/data_pipelines"  # not this machine's


def test_check_mode_reports_a_stale_file(tmp_path, monkeypatch):
    monkeypatch.setattr(config_doc, "OUTPUT", tmp_path / "config.md")
    monkeypatch.setattr(config_doc, "ROOT", tmp_path)
    said = []
    assert config_doc.main(["--check"], out=said.append) == 1
    assert config_doc.COMMAND in said[0]
    assert config_doc.main(["--write"], out=said.append) == 0
    assert config_doc.main(["--check"], out=said.append) == 0


def test_readme_is_a_front_door_to_every_doc():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    linked = {(README.parent / t.split("#")[0]).resolve() for t in links(README)}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md does not link docs/{missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor of the page itself
        path = target.split("#")[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"
