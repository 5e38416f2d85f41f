"""Terminal tables for compress responses (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from stepzip.schemas import compress as schemas


def print_compress_table(out: schemas.CompressResponse, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"stepzip on {out.model} (steps cut at {out.delimiter!r})")
    for col in ("problem", "steps", "H total", "variant", "kept/skipped", "tokens",
                "reduction", "answer", "gold", "ok"):
        table.add_column(col, overflow="fold")
    for p in out.results:
        for t in p.traces:
            name = (p.id or "?") + (f"#{t.sample}" if t.sample else "")
            table.add_row(name, str(len(t.steps)), f"{t.entropy_total:.1f}", "full",
                          f"{len(t.steps)}/0", str(t.reasoning_tokens), "0%",
                          _short(t.extracted_answer), _short(p.gold), _mark(t.correct))
            for v in t.variants:
                label = v.strategy + (f" {v.ratio:g}" if v.ratio is not None else "")
                table.add_row("", "", "", label, f"{len(v.kept_steps)}/{v.n_skipped}",
                              f"{v.tokens_before}->{v.tokens_after}", f"{v.reduction:.0%}",
                              _short(v.extracted_answer), "", _mark(v.correct))
    console.print(table)
    u, tm = out.usage, out.timings
    console.print(f"tokens: prompt {u.prompt_tokens}, completion {u.completion_tokens}, "
                  f"answers {u.answer_tokens}; time: generate {tm.generate_s:.2f} s, "
                  f"entropy fetch {tm.entropy_fetch_s * 1000:.1f} ms, answers {tm.answer_s:.2f} s,"
                  f" total {tm.total_s:.2f} s")


def _short(value: str | None, width: int = 12) -> str:
    if value is None:
        return "-"
    return value if len(value) <= width else value[: width - 1] + "…"


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "no")
