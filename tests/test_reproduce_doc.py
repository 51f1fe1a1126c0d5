"""docs/reproduce.md cannot rot silently: its presets, weights tags, class orders and commands match the presets."""

import re
from pathlib import Path

import pytest

from retain.config import load_config, preset_names
from retain.inspect import dry_scenario

DOC = Path(__file__).resolve().parent.parent / "docs" / "reproduce.md"
PAPER_GROUPS = ("ln_tuning/", "pad/", "peft_vit/", "confit/")
RNG_WORDS = {"python seed": "python", "torch seed": "torch"}


def rows() -> list[dict[str, str]]:
    """Every table row of the page whose ``preset`` cell holds a preset, as {column: cell}."""
    found, header = [], None
    for line in DOC.read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set(line) <= set("|-: ") and re.fullmatch(r"`[\w/]+`", cells[header.index("preset")]):
            found.append(dict(zip(header, cells, strict=True)))
    return found


ROWS = rows()


def _preset(row: dict[str, str]) -> str:
    return row["preset"].strip("`")


def test_page_has_rows_for_every_paper_preset():
    named = {_preset(r) for r in ROWS}
    paper = {p for p in preset_names() if p.startswith(PAPER_GROUPS)}
    assert len(ROWS) >= 30
    assert paper - named == set(), "paper presets missing from docs/reproduce.md"


@pytest.mark.parametrize("row", ROWS, ids=_preset)
def test_row_matches_its_preset(row):
    preset = _preset(row)
    cfg = load_config(preset)  # resolves (defaults chain included) or raises
    assert row["weights tag"] == f"`{cfg.model.backbone}`"
    assert row["command"].startswith(f"`retain run {preset} ") or row["command"] == f"`retain run {preset}`"
    assert row["ours"] == "not run (GPU preset)" or re.search(r"\d", row["ours"]), "ours: a number or why not"
    assert row["paper"] == "not stated" or row["paper"] == "-" or re.fullmatch(r"[\d.]+( / [\d.]+)?", row["paper"])
    _check_class_order(row["class order"], cfg)


def _check_class_order(cell: str, cfg) -> None:
    kind, _, rest = cell.partition(":")
    listed = [int(c) for c in re.match(r"[\d, ]+", rest.strip()).group().replace(" ", "").strip(",").split(",")]
    assert dry_scenario(cfg).class_order[: len(listed)] == listed
    s = cfg.scenario
    if kind == "explicit":
        assert s.class_order is not None
    elif kind == "natural":
        assert s.class_order is None and s.order_seed is None
    else:
        words, seed = kind.rsplit(" ", 1)
        assert s.class_order is None and (RNG_WORDS[words], int(seed)) == (s.order_rng, s.order_seed)


def test_paper_numbers_match_methods_table():
    """The PEFT-ViT numbers, the only paper table known, as ../shared/METHODS.md has them (where it is present)."""
    methods = DOC.parent.parent.parent / "shared" / "METHODS.md"
    if not methods.exists():
        pytest.skip("../shared/METHODS.md is absent")
    text = methods.read_text().replace("**", "")
    for row in ROWS:
        if row["paper"] not in ("not stated", "-"):
            acc, knn = row["paper"].split(" / ")
            assert re.search(rf"\| {re.escape(acc)} \| {re.escape(knn)} \|", text), row["preset"]
