"""The analysis as one static page: `index.html` beside the pictures it shows (no server,
no script from elsewhere). A line at the bottom says, once the page has loaded, whether
every picture loaded (and names those that did not)."""

from __future__ import annotations

import html
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from detr_jax.analysis.slots import CSV_COLUMNS, PROPERTIES, SlotStatistics

STATUS_SCRIPT = """
<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((im) => !(im.complete && im.naturalWidth > 0));
  const status = document.getElementById("status");
  status.textContent = broken.length
    ? `pictures: ${broken.length} of ${images.length} failed to load: ` + broken.map((im) => im.getAttribute("src")).join(", ")
    : `pictures: all ${images.length} loaded`;
  document.body.dataset.pictures = broken.length ? "broken" : "ok";
});
</script>
"""

STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1400px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
th { background: #f0f0f0; }
td.left, th.left { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.3em 0; }
.note { color: #555; font-size: 0.9em; max-width: 60em; }
#status { color: #555; font-size: 0.85em; border-top: 1px solid #ccc; padding-top: 0.5em; }
"""


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """An HTML table (no header row when None); the first `left` columns left-aligned.
    Cells are already escaped."""
    def row(cells, tag):
        return "<tr>" + "".join(f'<{tag}{" class=left" if i < left else ""}>{c}</{tag}>'
                                for i, c in enumerate(cells)) + "</tr>"
    head = row([html.escape(h) for h in header], "th") if header else ""
    return "<table>" + head + "".join(row(r, "td") for r in rows) + "</table>"


def specialization_rows(stats: SlotStatistics) -> list[list[str]]:
    """Rows of the specialization table: property, predictions, MI, baseline, ratio, H, share."""
    rows = []
    for subset in ("confident", "all"):
        for prop in PROPERTIES:
            m = stats.specialization[subset][prop]
            base = m["baseline_mi_bits"]
            ratio = m["mi_bits"] / base if base else None
            rows.append([html.escape(prop), html.escape(subset), str(m["samples"]), _number(m["mi_bits"]),
                         f'{_number(base, 4)} ± {_number(m["baseline_std_bits"], 4)}',
                         _number(ratio, 1) if ratio is not None else "–", _number(m["entropy_bits"]),
                         f'{100 * m["mi_share"]:.1f}%'])
    return rows


def write_report(
    out_dir: str | pathlib.Path,
    stats: SlotStatistics,
    *,
    summary: Mapping[str, Any],
    slot_pictures: Sequence[tuple[str, str]],
    attention_pictures: Sequence[tuple[str, str]],
    class_names: Mapping[int, str] | None = None,
) -> pathlib.Path:
    """Writes out_dir/index.html and returns its path.

    Args:
      stats: the slot statistics.
      summary: {label: value} shown at the top (checkpoint, split, images, ...).
      slot_pictures, attention_pictures: (file relative to out_dir, caption) pairs.
    """
    names = class_names or {}
    s = stats.settings
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<title>detr-jax analyze: what the object queries learned</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>What the object queries and attention learned</h1>",
        _table(None, [[html.escape(str(k)), html.escape(str(v))] for k, v in summary.items()], left=2),
        "<h2>How specialized the query slots are</h2>",
        f"<p class=note>Mutual information (bits) between the query slot and a property of its prediction: the "
        f"location cell of the box centre ({s['grid']}x{s['grid']} grid), the box size (terciles of sqrt(w h)) "
        f"and the class; over confident predictions (score &ge; {s['score_threshold']:g}) and over all. The "
        f"baseline is the same estimate with the slots shuffled within each image ({s['shuffles']} permutations, "
        "mean &plusmn; std): it is what chance and the finite sample give. <i>share</i> = MI / H(property): "
        "the part of the property's uncertainty that knowing the slot removes.</p>",
        _table(["property", "predictions", "samples", "MI (bits)", "shuffled baseline", "MI / baseline",
                "H(property)", "share"], specialization_rows(stats), left=2),
        "<h2>Where each slot predicts boxes</h2>",
        "<p class=note>One panel per slot: the centres of its predicted boxes over the images, in the unit "
        "square of the image (y down), coloured by box size.</p>",
    ]
    for file, caption in slot_pictures:
        parts.append(f'<figure><img src="{html.escape(file)}" alt="{html.escape(caption)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("<h2>Per slot</h2><p class=note>Also in slots.csv and slots.json; centre and size "
                 "statistics over the slot's confident predictions.</p>")
    columns = [c for c in CSV_COLUMNS if c.startswith(("slot", "confident", "mean_score", "top_class"))]
    rows = []
    for slot in stats.per_slot:
        cells = [_number(slot[c]) for c in columns]
        cells[columns.index("top_class")] = html.escape(names.get(slot["top_class"], str(slot["top_class"]))
                                                        if slot["top_class"] is not None else "–")
        rows.append(cells + [html.escape(", ".join(f"{names.get(c, c)}: {n}" for c, n in slot["classes"].items()))])
    parts.append(_table([c.replace("confident_", "") for c in columns] + ["classes"], rows, left=1))
    parts.append("<h2>Attention</h2><p class=note>Encoder self-attention from the feature cells at the centres "
                 "of detected objects (marked), and each detection's decoder cross-attention over the feature "
                 "map, averaged over heads, at the feature map's resolution.</p>")
    for file, caption in attention_pictures:
        parts.append(f'<figure><img src="{html.escape(file)}" alt="{html.escape(caption)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts += ['<p id="status">pictures: loading…</p>', STATUS_SCRIPT, "</body></html>"]
    path = pathlib.Path(out_dir) / "index.html"
    path.write_text("\n".join(parts) + "\n")
    return path
