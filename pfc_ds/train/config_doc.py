"""``docs/config.md``, generated from the config dataclasses so the reference cannot drift.

    python -m pfc_ds.train.config_doc --write     # rewrite docs/config.md
    python -m pfc_ds.train.config_doc --check     # exit 1 when docs/config.md is stale

Every YAML key of ``pfc_ds.train.config.Config`` (model, head, data, optim, train, eval) and of
``data_pipelines.config.DataConfig`` (the rec/folder keys under ``data:``) is listed with:

* its type and default, from the dataclass field;
* its description, from the comments beside or above the field in the source (read with
  ``tokenize``), or, for a field the source leaves uncommented, from ``NOTES`` below;
* what validation allows: the choices of every ``_choice``/``_one_of`` call, the rules of the
  validation tables in ``Config.validate`` and the ``"<key> must be ..."`` messages, read from
  the source with ``ast``, so a new check shows up here by itself.

``tests/test_docs.py`` fails when docs/config.md differs from ``render()``, when a key has no
description, and when a note in ``NOTES`` names no key or duplicates a source comment (so the
notes shrink as comments are added to the dataclasses). A command-line module: no library
imports it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import io
import os
import re
import sys
import textwrap
import tokenize
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from pfc_ds.train import config as train_config

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "docs" / "config.md"
COMMAND = "python -m pfc_ds.train.config_doc --write"
PIPELINE_MODULE = "data_pipelines.config"
# The trainer's ``data`` field that collects the rec/folder keys: not a key itself.
PIPELINE_FIELD = "pipeline"

# What each section is for, shown above its table.
SECTIONS: dict[str, str] = {
    "model": "The backbone (`pfc_ds/backbones/`).",
    "head": "The Partial FC head and its row-sparse optimizer ([head.md](head.md)).",
    "data": (
        "Every source. `source`, `num_classes`, `num_images`, `image_size` and `seed` are the "
        "trainer's; with `rec` or `folder` every other key goes to "
        "`data_pipelines.config.DataConfig` (next table). [data.md](data.md) explains them."
    ),
    "optim": (
        "The backbone's optimizer and the LR schedule (linear warmup, then polynomial decay; "
        "it drives the head's optimizer too)."
    ),
    "train": (
        "The run: batch, length, output, checkpoints, faults "
        "([training.md](training.md), [reliability.md](reliability.md))."
    ),
    "eval": "Verification sets scored while training ([evaluation.md](evaluation.md)).",
}
PIPELINE_INTRO = (
    "Keys of `data_pipelines.config.DataConfig`, read for `data.source: rec` and `folder` only "
    "(the synthetic source refuses them). An unknown key or a bad value is an error naming it."
)

# Descriptions of fields whose source has no comment. Better moved next to the field as a
# comment: tests/test_docs.py then asks for the note here to be removed.
NOTES: dict[str, str] = {
    "model.embedding_size": "the embedding size: the backbone's output and the centres' width",
    "model.dropout": (
        "dropout rate (iresnet, tiny: before the embedding layer; ViT: insightface's drop_rate; "
        "mobilefacenet refuses it)"
    ),
    "model.gradient_checkpointing": "recompute each block in the backward to save memory",
    "head.scale": "the logit scale `s` of the margin softmax",
    "head.sample_rate": (
        "the share of each rank's centres sampled per step (every positive plus uniform "
        "negatives); 1: full softmax; 0: positives only"
    ),
    "head.interclass_filtering_threshold": (
        "> 0: negative cosines above it are zeroed (insightface's filter for near-duplicate "
        "identities; targets never are); 0: off"
    ),
    "head.momentum": "the sgd head's momentum; None: optim.momentum",
    "head.weight_decay": "the head's weight decay; None: optim.weight_decay",
    "data.source": (
        "`synthetic` (learnable faces made on the device, `pfc_ds/train/synthetic.py`), "
        "`rec` (insightface RecordIO) or `folder` (one folder per identity)"
    ),
    "data.seed": (
        "the data's seed: rec/folder: the order (one global permutation per epoch); synthetic: "
        "its labels and images"
    ),
    "data.shuffle": "shuffle every epoch",
    "data.cache_dir": (
        "where the shared index tables and folder label maps are cached; null: a private "
        "table per process"
    ),
    "optim.name": "the backbone's optimizer",
    "optim.momentum": "SGD momentum (the backbone's, and an sgd head's unless head.momentum)",
    "optim.weight_decay": "weight decay (the backbone's, and the head's unless head.weight_decay)",
    "optim.betas": "AdamW's betas (the backbone's, and an adamw head's)",
    "optim.warmup_epochs": "linear warmup length in epochs of the data",
    "train.grad_accum": (
        "micro-batches per optimizer step; the head samples once for all of them, so K "
        "micro-batches of B act as one batch of K x B"
    ),
    "train.epochs": "run length in epochs when train.max_steps is not set",
    "train.seed": "the run's seed: backbone initialisation, head centres and sampling, dropout",
    "train.output": "output folder: checkpoints, metrics.jsonl, backbone.pt",
    "train.log_every": (
        "optimizer steps between progress lines and metrics.jsonl records (the losses are read "
        "back to the host once per interval)"
    ),
}

# Validation helpers of data_pipelines.config whose name says the rule.
PIPELINE_RULES = {"_positive": "a positive integer", "_probability": "a probability in [0, 1]"}
# "head.scale must be > 0, got ..." and "a.b, c.d and e.f must be >= 0": the keys, the rule.
_MUST = re.compile(r"^((?:[a-z_]+\.[a-z_]+(?:, | and )?)+) must be (.+?)(, got|$)")


@dataclass(frozen=True)
class Entry:
    """One YAML key of the reference."""

    section: str  # model, head, data, data_pipeline, optim, train, eval
    key: str  # the dotted YAML key: head.sample_rate
    type: str
    default: str
    doc: str  # the description: the source's comments, else the note in NOTES
    allowed: str = ""  # what validation allows, where it says
    from_source: bool = True  # the description is the source's comments


# ---- reading the source ------------------------------------------------------------------


def _field_comments(cls: type) -> dict[str, str]:
    """``name -> comment`` for the fields of dataclass ``cls``: the comment lines right above
    a field and the comment at its end, joined."""
    path = Path(inspect.getsourcefile(cls))
    text = path.read_text()
    comments: dict[int, str] = {}  # line -> its comment
    code_lines: set[int] = set()  # lines holding code (a comment there is not above a field)
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    node = next(
        n
        for n in ast.walk(ast.parse(text))
        if isinstance(n, ast.ClassDef) and n.name == cls.__name__
    )
    out = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above = []
        row = stmt.lineno - 1
        while row in comments and row not in code_lines:
            above.insert(0, comments[row])
            row -= 1
        beside = [comments[r] for r in range(stmt.lineno, stmt.end_lineno + 1) if r in comments]
        out[stmt.target.id] = " ".join(above + beside)
    return out


def _literal_key(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _rules(module, *, choice: str, prefix: str = "") -> dict[str, list[str]]:
    """``key -> [rule, ...]`` from the validation code of ``module``'s source."""
    tree = ast.parse(Path(inspect.getsourcefile(module)).read_text())
    namespace = vars(module)
    rules: dict[str, list[str]] = {}

    def add(key: str, rule: str) -> None:
        key = prefix + key
        if rule not in rules.setdefault(key, []):
            rules[key].append(rule)

    def add_message(text: str, *, whole: bool) -> None:
        m = _MUST.match(text)
        if m and (whole or m.group(3)):  # an f-string's rule must end before ", got {value}"
            for key in re.split(r", | and ", m.group(1)):
                add(key.removeprefix(prefix), m.group(2))

    in_fstring = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    helpers_seen: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name, args = node.func.id, node.args
            if name == choice and len(args) == 3 and (key := _literal_key(args[0])):
                allowed = eval(compile(ast.Expression(args[2]), "<allowed>", "eval"), namespace)
                shown = ", ".join("`null`" if a is None else f"`{a}`" for a in allowed)
                add(key, f"one of {shown}")
            elif name in PIPELINE_RULES and args and (key := _literal_key(args[0])):
                helpers_seen.add(name)
                if "." not in key:  # dali_aug.<key> is the mapping's own check
                    add(key, PIPELINE_RULES[name])
        elif isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple):
            for key, rule in _table_rules(node, helpers_seen):
                add(key, rule)
        elif isinstance(node, ast.Constant) and id(node) not in in_fstring:
            if isinstance(node.value, str):
                add_message(node.value, whole=True)
        elif isinstance(node, ast.JoinedStr) and (text := _literal_key(node.values[0])):
            add_message(text, whole=False)
    if module.__name__ == PIPELINE_MODULE and helpers_seen != set(PIPELINE_RULES):
        missing = sorted(set(PIPELINE_RULES) - helpers_seen)
        raise RuntimeError(f"config_doc: validation helpers {missing} no longer found")
    return rules


def _table_rules(loop: ast.For, helpers_seen: set[str]):
    """Rules of a validation loop over a literal table: ``for key, value, ok, want in ((...),
    ...)`` (``want`` says it), ``for key, value in ...: if value < 1`` (``>= 1``) and
    ``for name in ("a", "b"): _positive(name, ...)``."""
    rows = loop.iter.elts
    if all(_literal_key(r) for r in rows):  # for name in ("a", "b"): helper(name, ...)
        for call in ast.walk(loop):
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) in PIPELINE_RULES:
                helpers_seen.add(call.func.id)
                for r in rows:
                    yield r.value, PIPELINE_RULES[call.func.id]
        return
    if not all(isinstance(r, ast.Tuple) and r.elts and _literal_key(r.elts[0]) for r in rows):
        return
    bound = None
    for node in ast.walk(loop):
        if (
            isinstance(node, ast.Compare)
            and isinstance(node.ops[0], ast.Lt)
            and isinstance(node.comparators[0], ast.Constant)
        ):
            bound = node.comparators[0].value
    for r in rows:
        if len(r.elts) == 4 and (want := _literal_key(r.elts[3])):
            yield r.elts[0].value, want
        elif len(r.elts) == 2 and bound is not None:
            yield r.elts[0].value, f">= {bound}"


# ---- rendering ---------------------------------------------------------------------------


def _type_text(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return " or ".join("null" if t.strip() == "None" else t.strip() for t in text.split("|"))


def _value_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return _value_text(f.default)
    # A factory may read the environment (data.cache_dir): render it for a bare ``~``.
    env = {k: v for k, v in os.environ.items() if k != "XDG_CACHE_HOME"}
    with mock.patch.dict(os.environ, {**env, "HOME": "~"}, clear=True):
        return _value_text(f.default_factory())


def _entries_of(
    cls: type, section: str, skip: set[str], rules: dict[str, list[str]], *, fallback=None
) -> list[Entry]:
    comments = _field_comments(cls)
    other = _field_comments(fallback) if fallback is not None else {}
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        key = f"{section}.{f.name}"
        # Its own comment, else the note, else the pipeline's comment of a shared key.
        doc = comments.get(f.name) or NOTES.get(key) or other.get(f.name, "")
        noted = not comments.get(f.name) and key in NOTES
        allowed = "; ".join(rules.get(key, []))
        out.append(Entry(section, key, _type_text(f.type), _default(f), doc, allowed, not noted))
    return out


def entries() -> list[Entry]:
    """Every documented key, in the order of the sections and their fields."""
    rules = _rules(train_config, choice="_choice")
    pipeline = importlib.import_module(PIPELINE_MODULE)
    for key, found in _rules(pipeline, choice="_one_of", prefix="data.").items():
        if key not in rules:  # the trainer's check of a shared key comes first
            rules[key] = found
    out: list[Entry] = []
    for f in dataclasses.fields(train_config.Config):
        cls = f.default_factory
        if cls is train_config.DataSection:
            if PIPELINE_FIELD not in {g.name for g in dataclasses.fields(cls)}:
                raise RuntimeError(f"config_doc: DataSection.{PIPELINE_FIELD} is gone")
            mine = _entries_of(cls, "data", {PIPELINE_FIELD}, rules, fallback=pipeline.DataConfig)
            shared = {e.key.split(".", 1)[1] for e in mine}
            out += mine
            out += [
                dataclasses.replace(e, section="data_pipeline")
                for e in _entries_of(pipeline.DataConfig, "data", shared, rules)
            ]
        else:
            out += _entries_of(cls, f.name, set(), rules)
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(rows: list[Entry]) -> list[str]:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for e in rows:
        doc = _cell(e.doc)
        if e.allowed:
            doc = doc if doc.endswith(".") else doc + "."
            doc += f" **Allowed:** {_cell(e.allowed)}."
        lines.append(f"| `{e.key}` | {e.type} | `{_cell(e.default)}` | {doc} |")
    return lines


def render() -> str:
    """The text of docs/config.md."""
    all_entries = entries()
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{COMMAND}` from pfc_ds/train/config.py and",
        "     data_pipelines/config.py: edit the dataclasses' comments, not this file. -->",
        "",
        "Every key of the training YAML (`configs/*.yaml`), with its type, its default and what",
        "the config check allows. `train.py --set key=value` (repeatable) overrides one, its",
        "value read as YAML: `--set head.sample_rate=0.1`, `--set 'head.margin=[1.0,0.0,0.4]'`.",
        "An unknown key or a bad value is one error line naming the key and what is allowed;",
        "`train.sh` checks the config in one process before any rank starts. Precision, ZeRO",
        "stage and gradient clipping are the DeepSpeed JSON's (`ds_configs/`), not the YAML's; a",
        "clash between the two is an error naming the key.",
        "",
    ]
    sections = [f.name for f in dataclasses.fields(train_config.Config)]
    for section in sections:
        lines += [f"## `{section}:`", "", textwrap.fill(SECTIONS.get(section, ""), 96), ""]
        lines += _table([e for e in all_entries if e.section == section])
        lines.append("")
        if section == "data":
            lines += ["### `data:` with `source: rec` or `folder`", ""]
            lines += [textwrap.fill(PIPELINE_INTRO, 96), ""]
            lines += _table([e for e in all_entries if e.section == "data_pipeline"])
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, out: Callable[[str], Any] = print) -> int:
    p = argparse.ArgumentParser(prog="python -m pfc_ds.train.config_doc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"rewrite {OUTPUT.relative_to(ROOT)}")
    mode.add_argument("--check", action="store_true", help="exit 1 when the file is stale")
    args = p.parse_args(argv)
    text = render()
    if args.write:
        OUTPUT.write_text(text)
        out(f"wrote {OUTPUT.relative_to(ROOT)} ({len(entries())} keys)")
        return 0
    if args.check:
        stale = not OUTPUT.is_file() or OUTPUT.read_text() != text
        if stale:
            out(f"{OUTPUT.relative_to(ROOT)} is stale: run {COMMAND}")
        return int(stale)
    out(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
