"""The C{show --html} page: one self-contained HTML file summarising received TLS-RPT reports.

The tables are written here, so the page reads without scripts; the summary is embedded as
JSON (C{<script type="application/json" id="tlsrpt-data">}, the object C{show --json}
prints) and a small inline script draws two SVG charts from it: sessions per day (successful
and failed bars) and failures per day stacked by result type. Nothing is loaded from
elsewhere: a Content-Security-Policy of C{default-src 'none'}, with the inline style and
script allowed by their hashes, makes sure of it, and keeps any markup that report text could
smuggle in from running. Each bar carries C{data-day}, C{data-series} and C{data-value}.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

__all__ = ["render_html"]

_CSS = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 70em;
       padding: 0 1em; color: #1b1b1b; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin-top: 1.8em; }
#totals { display: flex; flex-wrap: wrap; gap: 1em; margin: 1em 0; }
.total { border: 1px solid #ddd; border-radius: 6px; padding: 0.5em 1em; min-width: 8em; }
.total .value { display: block; font-size: 1.6em; font-weight: 600; }
.total.successful .value { color: #2e7d32; }
.total.failed .value { color: #c62828; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { padding: 0.25em 0.8em; border-bottom: 1px solid #e4e4e4; text-align: left;
         vertical-align: top; }
th { background: #f4f4f4; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
svg.chart { max-width: 100%; height: auto; display: block; }
svg.chart text { font: 11px system-ui, sans-serif; fill: #444; }
svg.chart .axis { stroke: #999; stroke-width: 1; }
svg.chart .grid { stroke: #e4e4e4; stroke-width: 1; }
.legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 0.4em 1.2em; }
.legend .swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.35em;
                  vertical-align: -0.1em; border-radius: 2px; }
.muted { color: #666; }
.sw-successful { background: #2e7d32; } .sw-failed { background: #c62828; }
"""

_JS = r"""
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var data = JSON.parse(document.getElementById("tlsrpt-data").textContent);
  var COLORS = {
    "successful": "#2e7d32", "failed": "#c62828",
    "starttls-not-supported": "#b71c1c", "certificate-host-mismatch": "#e65100",
    "certificate-expired": "#f9a825", "certificate-not-trusted": "#ef6c00",
    "validation-failure": "#6a1b9a", "tlsa-invalid": "#283593",
    "dnssec-invalid": "#1565c0", "dane-required": "#00838f",
    "sts-policy-fetch-error": "#ad1457", "sts-policy-invalid": "#4e342e",
    "sts-webpki-invalid": "#795548", "(no details)": "#9e9e9e"
  };
  var EXTRA = ["#546e7a", "#827717", "#37474f", "#880e4f", "#33691e"];
  var extraUsed = 0;
  var H = 240, TOP = 14, BOTTOM = 42, LEFT = 52, RIGHT = 12;
  // One slot per day: 40 units wide, narrower for many days so the chart stays readable.
  var SLOT = Math.max(8, Math.min(40, 880 / Math.max(1, data.days.length)));

  function node(name, attrs, text) {
    var e = document.createElementNS(NS, name);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, String(attrs[k])); });
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function typeName(t) { return t === null ? "(no details)" : t; }
  function color(series) {
    if (!Object.prototype.hasOwnProperty.call(COLORS, series)) {
      COLORS[series] = EXTRA[extraUsed++ % EXTRA.length];
    }
    return COLORS[series];
  }
  function nice(v) {
    if (v <= 0) { return 1; }
    var p = Math.pow(10, Math.floor(Math.log10(v))), m = v / p;
    return [1, 2, 4, 5, 10].filter(function (c) { return c >= m - 1e-9; })[0] * p;
  }
  function frame(svg, max) {
    var days = data.days, width = Math.max(640, LEFT + RIGHT + days.length * SLOT);
    var plot = H - TOP - BOTTOM, top = nice(max);
    var step = Math.ceil(36 / SLOT);
    svg.setAttribute("viewBox", "0 0 " + width + " " + H);
    svg.setAttribute("width", width);
    svg.setAttribute("height", H);
    [0, 0.5, 1].forEach(function (f) {
      var y = TOP + plot - f * plot, v = f * top;
      if (v % 1) { return; }
      svg.appendChild(node("line", {"class": f ? "grid" : "axis", x1: LEFT, x2: width - RIGHT,
                                    y1: y, y2: y}));
      svg.appendChild(node("text", {x: LEFT - 6, y: y + 4, "text-anchor": "end"}, String(v)));
    });
    days.forEach(function (d, i) {
      if (i % step === 0) {
        svg.appendChild(node("text", {"class": "day-label", "text-anchor": "middle",
                                      x: LEFT + (i + 0.5) * SLOT, y: H - BOTTOM + 16},
                             d.day.slice(5)));
      }
    });
    return function (value) { return value / top * plot; };
  }
  function bar(svg, x, y0, w, h, day, series, value) {
    if (value > 0 && h < 2) { h = 2; }
    var r = node("rect", {"class": "bar", x: x, y: y0 - h, width: w, height: h,
                          fill: color(series), "data-day": day, "data-series": series,
                          "data-value": value});
    r.appendChild(node("title", {}, day + ": " + value + " " + series));
    svg.appendChild(r);
    return h;
  }
  function drawDays(svg) {
    var top = 0, w = SLOT * 0.35;
    data.days.forEach(function (d) { top = Math.max(top, d.successful, d.failed); });
    var scale = frame(svg, top), base = H - BOTTOM;
    data.days.forEach(function (d, i) {
      var x = LEFT + i * SLOT + SLOT * 0.125;
      bar(svg, x, base, w, scale(d.successful), d.day, "successful", d.successful);
      bar(svg, x + w + SLOT * 0.05, base, w, scale(d.failed), d.day, "failed", d.failed);
    });
  }
  function drawTypes(svg, legend) {
    var top = 0;
    data.days.forEach(function (d) {
      var sum = 0;
      d["result-types"].forEach(function (t) { sum += t.failed; });
      top = Math.max(top, sum);
    });
    data["result-types"].forEach(function (t) {
      var name = typeName(t["result-type"]), li = document.createElement("li");
      var sw = document.createElement("span");
      sw.className = "swatch";
      li.appendChild(sw);
      li.appendChild(document.createTextNode(name + ": " + t.failed));
      li.setAttribute("data-series", name);
      legend.appendChild(li);
      sw.style.backgroundColor = color(name);
    });
    var scale = frame(svg, top), base = H - BOTTOM;
    data.days.forEach(function (d, i) {
      var y = base, x = LEFT + (i + 0.2) * SLOT, failed = new Map();
      d["result-types"].forEach(function (dt) {
        var name = typeName(dt["result-type"]);
        failed.set(name, (failed.get(name) || 0) + dt.failed);
      });
      // Stacked in the legend's order; each name once.
      data["result-types"].forEach(function (t) {
        var name = typeName(t["result-type"]), value = failed.get(name);
        if (value !== undefined) {
          failed.delete(name);
          y -= bar(svg, x, y, SLOT * 0.6, scale(value), d.day, name, value);
        }
      });
    });
  }
  var days = document.getElementById("chart-days");
  if (days) { drawDays(days); }
  var types = document.getElementById("chart-types");
  if (types) { drawTypes(types, document.getElementById("legend-types")); }
  document.documentElement.setAttribute("data-drawn", "yes");
})();
"""


def _hash(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()


_CSP = (
    f"default-src 'none'; style-src '{_hash(_CSS)}'; script-src '{_hash(_JS)}'; "
    "base-uri 'none'; form-action 'none'"
)


def _embed(summary: Mapping[str, Any]) -> str:
    """The summary as JSON that cannot end its C{<script>} element or open a comment."""
    text = json.dumps(summary, ensure_ascii=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _rate(ok: int, bad: int) -> str:
    return f"{100 * bad / (ok + bad):.1f}%" if ok + bad else "-"


def _table(
    section: str, title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]
) -> str:
    """A titled table; C{int} cells are right-aligned numbers, everything else escaped text."""
    head = "".join(
        f'<th class="n">{escape(h)}</th>'
        if rows and isinstance(rows[0][i], int)
        else f"<th>{escape(h)}</th>"
        for i, h in enumerate(headers)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{c}</td>' if isinstance(c, int) else f"<td>{escape(str(c))}</td>"
            for c in row
        )
        + "</tr>"
        for row in rows
    )
    return (
        f'<section id="{section}"><h2>{escape(title)}</h2>'
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></section>"
    )


def _type_name(rtype: str | None) -> str:
    return "(no details)" if rtype is None else rtype


def _days_text(date_range: Mapping[str, str] | None) -> str:
    if date_range is None:
        return ""
    first, last = date_range["first-day"], date_range["last-day"]
    return first if first == last else f"{first} to {last}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _tables(summary: Mapping[str, Any]) -> list[str]:
    parts = [
        _table(
            "organizations",
            "By organization",
            ("Organization", "Reports", "Successful", "Failed", "Failed %"),
            [
                (
                    o["organization-name"],
                    o["reports"],
                    o["successful"],
                    o["failed"],
                    _rate(o["successful"], o["failed"]),
                )
                for o in summary["organizations"]
            ],
        ),
        _table(
            "policy-domains",
            "By policy domain",
            ("Policy domain", "Policy", "Successful", "Failed", "Failed %"),
            [
                (
                    d["policy-domain"] or "(not given)",
                    ", ".join(d["policy-types"]),
                    d["successful"],
                    d["failed"],
                    _rate(d["successful"], d["failed"]),
                )
                for d in summary["policy-domains"]
            ],
        ),
    ]
    if summary["result-types"]:
        parts.append(
            _table(
                "result-types",
                "Failures by result type",
                ("Result type", "Failed"),
                [(_type_name(t["result-type"]), t["failed"]) for t in summary["result-types"]],
            )
        )
    if summary["mx-hosts"]:
        parts.append(
            _table(
                "mx-hosts",
                "Failing MX hosts",
                ("MX host", "Failed", "Result types"),
                [
                    (h["receiving-mx-hostname"], h["failed"], ", ".join(h["result-types"]))
                    for h in summary["mx-hosts"]
                ],
            )
        )
    if summary["receiving-ips"]:
        parts.append(
            _table(
                "receiving-ips",
                "Failing receiving IPs",
                ("Receiving IP", "Failed", "MX hosts"),
                [
                    (i["receiving-ip"], i["failed"], ", ".join(i["receiving-mx-hostnames"]))
                    for i in summary["receiving-ips"]
                ],
            )
        )
    parts.append(
        _table(
            "days",
            "By day (UTC)",
            ("Day", "Reports", "Successful", "Failed", "Failed %"),
            [
                (
                    d["day"],
                    d["reports"],
                    d["successful"],
                    d["failed"],
                    _rate(d["successful"], d["failed"]),
                )
                for d in summary["days"]
            ],
        )
    )
    parts.append(
        _table(
            "reports",
            "Reports read",
            ("Organization", "Report-ID", "Start", "Successful", "Failed", "Source"),
            [
                (
                    r["organization-name"],
                    r["report-id"],
                    r["start-datetime"],
                    r["successful"],
                    r["failed"],
                    r["source"],
                )
                for r in summary["reports"]
            ],
        )
    )
    return parts


def _charts() -> list[str]:
    note = "<noscript><p class=muted>The charts need JavaScript.</p></noscript>"
    return [
        '<section id="sessions-per-day"><h2>Sessions per day</h2>'
        '<ul class="legend"><li><span class="swatch sw-successful"></span>successful</li>'
        '<li><span class="swatch sw-failed"></span>failed</li></ul>'
        f'<svg class="chart" id="chart-days" role="img"'
        f' aria-label="Successful and failed sessions per day"></svg>{note}</section>',
        '<section id="failures-per-type"><h2>Failures per day by result type</h2>'
        '<ul class="legend" id="legend-types"></ul>'
        f'<svg class="chart" id="chart-types" role="img"'
        f' aria-label="Failed sessions per day by result type"></svg>{note}</section>',
    ]


def _problems(summary: Mapping[str, Any]) -> list[str]:
    parts = []
    if summary["skipped"]:
        parts.append(
            _table(
                "skipped",
                f"Skipped inputs ({len(summary['skipped'])})",
                ("Source", "Reason"),
                [(s["source"], s["reason"]) for s in summary["skipped"]],
            )
        )
    if summary["duplicates"]:
        parts.append(
            _table(
                "duplicates",
                f"Seen again, counted once ({len(summary['duplicates'])})",
                ("Source", "Report-ID", "First read from"),
                [(d["source"], d["report-id"], d["first-source"]) for d in summary["duplicates"]],
            )
        )
    return parts


def render_html(summary: Mapping[str, Any]) -> str:
    """Return the page for L{postfix_mtasts.tlsrpt.show.summarise}'s object.

    No external resource, link or font: styles, script and data are inline, and the page's
    Content-Security-Policy forbids loading anything.
    """
    totals = summary["totals"]
    covered = _days_text(summary["date-range"])
    body: list[str] = []
    if summary["date-range"] is None:
        body.append('<p id="range">No TLS-RPT report was read.</p>')
    else:
        ok, bad = totals["successful"], totals["failed"]
        body.append(
            f'<p id="range">{_plural(totals["reports"], "report")} from'
            f" {_plural(len(summary['organizations']), 'organization')},"
            f" {escape(covered)} (UTC)</p>"
        )
        boxes = [
            ("reports", "Reports", str(totals["reports"])),
            ("successful", "Successful sessions", str(ok)),
            ("failed", "Failed sessions", str(bad)),
            ("rate", "Failed", _rate(ok, bad)),
        ]
        body.append(
            '<section id="totals">'
            + "".join(
                f'<div class="total {key}" id="total-{key}"><span class="label">{label}</span>'
                f'<span class="value">{value}</span></div>'
                for key, label, value in boxes
            )
            + "</section>"
        )
        body += _charts()
        body += _tables(summary)
    body += _problems(summary)
    title = "TLS-RPT reports" + (f", {covered}" if covered else "")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="referrer" content="no-referrer">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n"
        f"<style>{_CSS}</style>\n"
        "</head><body>\n"
        "<h1>TLS-RPT reports</h1>\n" + "\n".join(body) + "\n"
        f'<script type="application/json" id="tlsrpt-data">{_embed(summary)}</script>\n'
        f"<script>{_JS}</script>\n"
        "</body></html>\n"
    )
