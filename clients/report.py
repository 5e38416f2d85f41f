"""Terminal output for compress runs: a progress bar and a table that fits the terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from stepzip.schemas import compress as schemas

# (header, justify, max width). Rows stay one line: cells are cut with an ellipsis, never
# wrapped, and to fit the terminal gold, then answer, then id give up width (ids last:
# they name the row).
COLUMNS = (("id", "left", 32), ("H", "right", 8), ("variant", "left", 9),
           ("kept/skip", "right", 9), ("tokens", "right", 11), ("cut", "right", 4),
           ("answer", "left", 16), ("gold", "left", 16))
SHRINK_ORDER = (7, 6, 0)  # gold, answer, id
MIN_TEXT = 6  # narrowest a shrinking column gets
GAP = 3  # between columns: one space of padding each side and a blank rule


def column_widths(rows: list[list[str]], width: int) -> list[int]:
    """Each column's content width (capped); then text columns shrink, in SHRINK_ORDER,
    until the table fits `width`."""
    widths = [min(cap, max([len(header)] + [len(r[i]) for r in rows]))
              for i, (header, _, cap) in enumerate(COLUMNS)]
    excess = sum(widths) + GAP * (len(widths) - 1) - width
    for i in SHRINK_ORDER:
        cut = max(0, min(excess, widths[i] - MIN_TEXT))
        widths[i] -= cut
        excess -= cut
    return widths


@contextlib.contextmanager
def progress_bar(label: str, total: int,
                 console: Console | None = None) -> Iterator[Callable[[int, int], None]]:
    """Yields `update(done, total)`; shows a spinner, done/total and elapsed time on
    stderr (where it does not mix with --json output) and clears it at the end."""
    console = console or Console(stderr=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=total)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def print_compress_table(out: schemas.CompressResponse, console: Console | None = None, *,
                         wall_s: float | None = None) -> None:
    """The table, a token line and a time line (`timing_line`; `wall_s`: the caller's
    wall time around the whole call)."""
    console = console or Console()
    if not console.is_terminal:  # logs and pipes: no terminal width to fit, keep rows whole
        console = Console(width=140, file=console.file)
    rows: list[list[str]] = []
    for p in out.results:
        for t in p.traces:
            name = (p.id or "-") + (f"#{t.sample}" if t.sample else "")
            rows.append([name, f"{t.entropy_total:.1f}", "full", f"{len(t.steps)}/0",
                         str(t.reasoning_tokens), "0%", _answer(t.extracted_answer, t.correct),
                         _text(p.gold)])
            for v in t.variants:
                label = v.strategy + (f" {v.ratio:g}" if v.ratio is not None else "")
                rows.append(["", "", label, f"{len(v.kept_steps)}/{v.n_skipped}",
                             f"{v.tokens_before}→{v.tokens_after}", f"{v.reduction:.0%}",
                             _answer(v.extracted_answer, v.correct), ""])
    table = Table(title=f"stepzip on {out.model} (steps cut at {out.delimiter!r})",
                  title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  padding=(0, 1), pad_edge=False)
    for (header, justify, _), w in zip(COLUMNS, column_widths(rows, console.width)):
        table.add_column(header, justify=justify, width=w, no_wrap=True, overflow="ellipsis")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    u = out.usage
    console.print(f"tokens: prompt {u.prompt_tokens}, completion {u.completion_tokens}, "
                  f"answers {u.answer_tokens}")
    console.print(timing_line(out.timings, wall_s), markup=False)


def timing_line(tm: schemas.Timings, wall_s: float | None) -> str:
    """Wall time, then the server's request time summed over requests (requests run side
    by side, so the sum may exceed the wall time) with its parts: generating (the
    entropy fetch is part of it) and answering."""
    wall = "" if wall_s is None else f"wall {wall_s:.2f} s; "
    return (f"time: {wall}request time summed over requests {tm.total_s:.2f} s (generate "
            f"{tm.generate_s:.2f} s, of which entropy fetch {tm.entropy_fetch_s * 1000:.1f} "
            f"ms; answers {tm.answer_s:.2f} s)")


def _text(value: str | None) -> str:
    return "-" if value is None else " ".join(value.split())  # one line


def _answer(value: str | None, ok: bool | None) -> str:
    """The answer, its grade first so that cutting a long answer keeps the grade."""
    mark = "" if ok is None else ("✓ " if ok else "✗ ")
    return mark + _text(value)
