"""DVC stage `scan` (always run): account for every entry of data.source in one table.

`ingest` depends on this table instead of the raw folder, which DVC could not always hash (see
charaforge.prepare.scan).
"""

from charaforge.core import layout
from charaforge.core.files import write_json, write_parquet
from charaforge.pipeline.stage import StageContext, run_stage
from charaforge.prepare import ingest, scan


def body(ctx: StageContext) -> None:
    data = ctx.params.data
    source = ingest.check_source(data.source)
    table = scan.scan_folder(source, data.ingest)
    summary = scan.summarise(table)
    write_parquet(layout.SCAN_TABLE, table)
    write_json(
        f"{layout.SCAN_DIR}/summary.json",
        {
            "source": scan.escape_name(data.source),
            "entries": summary.entries,
            "kept": summary.kept,
            "quarantined": summary.quarantined,
            "ignored": summary.ignored,
        },
    )
    ctx.run.log_metrics(
        {
            "entries": summary.entries,
            "kept": summary.kept,
            "quarantined": summary.quarantined,
            "ignored": summary.ignored,
        }
    )


if __name__ == "__main__":
    run_stage("scan", body, sections=("data",))
