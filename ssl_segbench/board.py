"""The board model: what the leaderboard shows, built once from records and published entries (`build`) and rendered
twice, as markdown (`leaderboard`) and as the static site's HTML (`site`), so the two can differ in form only, never
in their rows, columns, order, numbers, published marks or caveats. Pure data: no markdown, no HTML.

Per dataset a `Board`; per split a `SplitBoard`: its columns (`BoardColumn`: a `Setting.column` with its unique
header and its cells ranked by mIoU), its rows (`Row`: a `Record.row_label`, the backbone's registry facts, one cell
or None per column) ranked by the first column's mIoU, and the reported numbers of that split. A `Cell` is one record
with the published entry whose claim it matches (`published.published_for`), that entry's text and the record's
caveats. `Summary` is the cross-dataset overview both README.md and index.html are drawn from."""
from __future__ import annotations

from dataclasses import dataclass

from .pages import DEMO_DATASETS
from .published import footnote, published_for, published_text, reported_for
from .records import Record
from .setting import Column, unique_labels

SIZE_BUCKETS = ((50e6, "S (< 50 M)"), (150e6, "B (50-150 M)"), (500e6, "L (150-500 M)"), (float("inf"), "H+ (> 500 M)"))


@dataclass(frozen=True)
class Facts:
    """A backbone's registry facts, for the site's row filters: family, size bucket, parameters in millions."""

    family: str
    size: str
    params_m: float | None


def backbone_facts(backbone_id: str, registry: dict) -> Facts:
    """The facts the registry states; an ad-hoc backbone is family 'other' of unknown size."""
    spec = registry.get(backbone_id)
    n = spec.n_parameters if spec and spec.n_parameters else None
    bucket = next(label for limit, label in SIZE_BUCKETS if n < limit) if n else "unknown"
    return Facts(spec.family if spec else "other", bucket, n / 1e6 if n else None)


@dataclass(frozen=True)
class Cell:
    """One record's number: the published entry whose claim the record matches (or None), that entry's text (value,
    mark, difference) and the record's caveats."""

    record: Record
    published: dict | None
    published_text: str | None
    caveats: tuple[str, ...]

    @classmethod
    def of(cls, rec: Record, published: list[dict]) -> "Cell":
        entry = published_for(rec, published)
        return cls(rec, entry, published_text(rec, entry) if entry else None, tuple(rec.caveats()))

    @property
    def miou(self) -> float:
        return self.record.metrics["miou"]["mean"]


@dataclass(frozen=True)
class BoardColumn:
    """A column: a Setting without its backbone (`column`; the site filters by its axes), its header (the label, with
    the id appended where two columns of the split would read the same) and its cells ranked by mIoU, then row."""

    column: Column
    header: str
    ranked: tuple[Cell, ...]

    @property
    def spec(self) -> str:
        """The protocol as given to --protocol ('name' or 'name:preset')."""
        return self.column.axis("protocol")

    @property
    def footnotes(self) -> tuple[str, ...]:
        """What stands behind the published marks in this column, sorted, each once."""
        return tuple(sorted({footnote(c.published) for c in self.ranked if c.published}))


@dataclass(frozen=True)
class Row:
    """A backbone row: its label (`Record.row_label`), registry facts and one cell or None per column, in order."""

    label: str
    facts: Facts
    cells: tuple[Cell | None, ...]


@dataclass(frozen=True)
class SplitBoard:
    """One split of a dataset: `images` holds (number of images, content digest's first 12 hex digits) pairs of its
    records; rows are ranked by the first column's mIoU (rows without a cell there last), then by label."""

    split: str
    images: tuple[tuple[int, str], ...]
    columns: tuple[BoardColumn, ...]
    rows: tuple[Row, ...]
    reported: tuple[dict, ...]

    @property
    def n_images(self) -> tuple[int, ...]:
        return tuple(sorted({n for n, _ in self.images}))

    @property
    def has_caveats(self) -> bool:
        return any(c.caveats for col in self.columns for c in col.ranked)

    @property
    def footnotes(self) -> tuple[str, ...]:
        return tuple(sorted({n for col in self.columns for n in col.footnotes}))

    @property
    def axes(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """(axis name, the sorted values the columns take) for every axis of the columns, in order of appearance."""
        names = dict.fromkeys(name for col in self.columns for name, _, _ in col.column.axes)
        return tuple((n, tuple(sorted({col.column.axis(n) for col in self.columns}))) for n in names)

    @property
    def row_axes(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """('family' | 'size', the sorted values the rows take)."""
        return (("family", tuple(sorted({r.facts.family for r in self.rows}))),
                ("size", tuple(sorted({r.facts.size for r in self.rows}))))


@dataclass(frozen=True)
class Board:
    """A dataset's page: its splits, the note on demo data where it is one, and its records (in input order)."""

    dataset: str
    demo_note: str | None
    splits: tuple[SplitBoard, ...]
    records: tuple[Record, ...]


@dataclass(frozen=True)
class SummaryColumn:
    """A column of the cross-dataset summary: the column of (dataset/split, protocol) holding the most backbones."""

    dataset: str
    split: str
    spec: str
    column_id: str

    @property
    def header(self) -> str:
        return f"{self.dataset}/{self.split} {self.spec}"


@dataclass(frozen=True)
class SummaryRow:
    label: str
    cells: tuple[Cell | None, ...]


@dataclass(frozen=True)
class Summary:
    """Across datasets (sorted): README.md's grid (`columns` × `rows`: backbones, each cell from the column of that
    protocol holding the most backbones) and index.html's best cell per dataset and protocol (`best`: (dataset, its
    best cell per protocol of `specs` over every split and column, None where it has none))."""

    datasets: tuple[str, ...]
    columns: tuple[SummaryColumn, ...]
    rows: tuple[SummaryRow, ...]
    specs: tuple[str, ...]
    best: tuple[tuple[str, tuple[Cell | None, ...]], ...]

    def demo_notes(self) -> tuple[tuple[str, str], ...]:
        """(dataset, note) for the datasets that are demo data."""
        return tuple((ds, DEMO_DATASETS[ds]) for ds in self.datasets if ds in DEMO_DATASETS)


@dataclass(frozen=True)
class Boards:
    """Everything the leaderboard shows: a Board per dataset (sorted), the summary, and the records (input order)."""

    pages: tuple[Board, ...]
    summary: Summary
    records: tuple[Record, ...]


def _grouped(records, field: str) -> dict[str, list[Record]]:
    """Records by their identity's `field` (dataset, split), each group in input order."""
    out: dict[str, list[Record]] = {}
    for r in records:
        out.setdefault(r.identity[field], []).append(r)
    return out


def build(records: list[Record], published: list[dict], registry: dict) -> Boards:
    """The boards of `records`: published entries matched once per record, backbone facts from `registry`."""
    pages = []
    for ds, recs in sorted(_grouped(records, "dataset").items()):
        splits = tuple(_split_board(ds, split, srecs, published, registry)
                       for split, srecs in sorted(_grouped(recs, "split").items()))
        pages.append(Board(ds, DEMO_DATASETS.get(ds), splits, tuple(recs)))
    return Boards(tuple(pages), _summary(tuple(pages)), tuple(records))


def _split_board(dataset: str, split: str, recs: list[Record], published: list[dict], registry: dict) -> SplitBoard:
    placed = [(Cell.of(r, published), r.setting.column) for r in recs]  # a Setting is derived on each access: once
    kinds = {col.id: col for _, col in placed}
    columns = tuple(BoardColumn(kinds[cid], header, tuple(sorted(
        (cell for cell, col in placed if col.id == cid), key=lambda c: (-c.miou, c.record.row_label()))))
        for cid, header in unique_labels(kinds.values()).items())
    by_row: dict[str, dict[str, Cell]] = {}
    for cell, col in placed:  # one cell per row and column: a later record of the same backbone and setting wins
        by_row.setdefault(cell.record.row_label(), {})[col.id] = cell
    first = columns[0].column.id
    order = sorted(by_row, key=lambda row: (-(by_row[row][first].miou if first in by_row[row] else -1.0), row))
    rows = tuple(Row(label, backbone_facts(next(iter(by_row[label].values())).record.backbone["id"], registry),
                     tuple(by_row[label].get(col.column.id) for col in columns)) for label in order)
    images = tuple(sorted({(r.dataset["n_images"], r.setting.data_digest[:12]) for r in recs}))
    return SplitBoard(split, images, columns, rows, tuple(reported_for(dataset, split, published)))


def _summary(pages: tuple[Board, ...]) -> Summary:
    chosen: dict[tuple[str, str], tuple[SummaryColumn, SplitBoard, int]] = {}  # key → (column, its split, its index)
    for page in pages:
        for board in page.splits:
            for spec in sorted({col.spec for col in board.columns}):
                held = {col.column.id: (i, sum(1 for row in board.rows if row.cells[i] is not None))
                        for i, col in enumerate(board.columns) if col.spec == spec}
                cid = max(sorted(held), key=lambda c: held[c][1])  # the most backbones; ties: the smaller id
                chosen[(f"{page.dataset}/{board.split}", spec)] = (
                    SummaryColumn(page.dataset, board.split, spec, cid), board, held[cid][0])
    keys = sorted(chosen)
    cells: dict[str, dict[tuple[str, str], Cell]] = {}
    for key in keys:
        _, board, i = chosen[key]
        for row in board.rows:
            if row.cells[i] is not None:
                cells.setdefault(row.label, {})[key] = row.cells[i]
    specs = tuple(sorted({col.spec for page in pages for board in page.splits for col in board.columns}))
    best = tuple((page.dataset, tuple(max((c for board in page.splits for col in board.columns if col.spec == spec
                                           for c in col.ranked), key=lambda c: (c.miou, c.record.row_label()),
                                          default=None) for spec in specs)) for page in pages)
    return Summary(tuple(page.dataset for page in pages), tuple(chosen[k][0] for k in keys),
                   tuple(SummaryRow(label, tuple(cells[label].get(k) for k in keys)) for label in sorted(cells)),
                   specs, best)
