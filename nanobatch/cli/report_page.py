"""The page skeleton, CSS and JS of ``report.html`` (see ``nanobatch.cli.report``).

Kept as a Python string rather than an ``.html`` data file so that it ships in
every wheel without any package-data configuration. Placeholders use
``string.Template`` syntax; the CSS and JS therefore contain no dollar signs.
"""

from __future__ import annotations

from string import Template

__all__ = ["PAGE"]

_CSS = """
:root {
  --bg: #f5f6f8; --fg: #1d2430; --muted: #5f6b7a; --card: #fff; --line: #dde1e7;
  --ok: #1f8a4c; --failed: #c62828; --blocked: #b26a00; --rejected: #8e24aa; --other: #5f6b7a;
  --ok-bg: #e3f4ea; --failed-bg: #fdecea; --blocked-bg: #fff3e0; --rejected-bg: #f3e5f5; --other-bg: #eceff1;
  --accent: #2c5fb8;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #14171c; --fg: #e6e9ee; --muted: #9aa4b2; --card: #1d2128; --line: #313843;
    --ok-bg: #143323; --failed-bg: #3a1717; --blocked-bg: #3a2a10; --rejected-bg: #2e1a36; --other-bg: #2a2f36;
    --ok: #5fd08c; --failed: #ff7b72; --blocked: #f0b35a; --rejected: #d69cf0; --accent: #7aa7ff;
  }
}
* { box-sizing: border-box; }
body {
  margin: 0; padding: 24px; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
}
h1 { font-size: 22px; margin: 0 0 2px; }
.sub { color: var(--muted); margin: 0 0 18px; word-break: break-all; }
.top { display: grid; grid-template-columns: minmax(280px, 1fr) minmax(320px, 1.3fr); gap: 16px; margin-bottom: 16px; }
@media (max-width: 820px) { .top { grid-template-columns: 1fr; } }
.panel { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px; }
.panel h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .05em; color: var(--muted); margin: 0 0 8px; }
.totals { display: grid; grid-template-columns: repeat(auto-fill, minmax(120px, 1fr)); gap: 10px 16px; margin: 0; }
.totals div { min-width: 0; }
.totals dt { color: var(--muted); font-size: 12px; }
.totals dd { margin: 0; font-size: 18px; font-weight: 600; font-variant-numeric: tabular-nums; }
.totals dd.ok { color: var(--ok); }
.totals dd.failed { color: var(--failed); }
.totals dd.blocked { color: var(--blocked); }
.totals dd.rejected { color: var(--rejected); }
.hist svg { width: 100%; height: auto; display: block; }
.hist .axis { fill: var(--muted); font-size: 11px; }
.hist .base { stroke: var(--line); }
.hist .mark { stroke: var(--muted); stroke-dasharray: 3 3; }
.hist .ok { fill: var(--ok); } .hist .failed { fill: var(--failed); }
.hist .blocked { fill: var(--blocked); } .hist .rejected { fill: var(--rejected); } .hist .other { fill: var(--other); }
.filters { display: flex; flex-wrap: wrap; gap: 8px; margin: 0 0 16px; }
.filters button {
  font: inherit; cursor: pointer; padding: 6px 14px; border-radius: 999px;
  border: 1px solid var(--line); background: var(--card); color: var(--fg);
}
.filters button[aria-pressed="true"] { background: var(--accent); border-color: var(--accent); color: var(--card); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 16px; }
.card {
  background: var(--card); border: 1px solid var(--line); border-left: 4px solid var(--other);
  border-radius: 10px; padding: 12px 14px; display: flex; flex-direction: column; gap: 10px; min-width: 0;
}
.card[hidden] { display: none; }
.card.ok { border-left-color: var(--ok); } .card.failed { border-left-color: var(--failed); }
.card.blocked { border-left-color: var(--blocked); } .card.rejected { border-left-color: var(--rejected); }
.card header { display: flex; align-items: center; justify-content: space-between; gap: 8px; }
.card h3 { margin: 0; font-size: 15px; word-break: break-all; }
.badge { font-size: 12px; font-weight: 600; padding: 2px 10px; border-radius: 999px; white-space: nowrap;
  background: var(--other-bg); color: var(--other); }
.badge.ok { background: var(--ok-bg); color: var(--ok); }
.badge.failed { background: var(--failed-bg); color: var(--failed); }
.badge.blocked { background: var(--blocked-bg); color: var(--blocked); }
.badge.rejected { background: var(--rejected-bg); color: var(--rejected); }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; }
.pair figure { margin: 0; min-width: 0; }
.pair figcaption {
  font-size: 11px; text-transform: uppercase; letter-spacing: .05em; color: var(--muted); margin-bottom: 4px;
}
.thumbs { display: flex; flex-wrap: wrap; gap: 4px; }
.thumbs img, .ph {
  border-radius: 6px; border: 1px solid var(--line); background: var(--bg);
  max-width: 100%; height: auto; object-fit: contain;
}
.thumbs.many img, .thumbs.many .ph { max-width: calc(50% - 2px); }
.ph {
  display: flex; flex-direction: column; align-items: center; justify-content: center; text-align: center;
  width: 100%; aspect-ratio: 1; padding: 6px; color: var(--muted); font-size: 12px; overflow: hidden;
  border-style: dashed; word-break: break-all;
}
.ph small { font-size: 10px; opacity: .85; }
.instr { margin: 0; padding-left: 20px; }
.instr li { margin: 2px 0; overflow-wrap: anywhere; }
.instr .fr { color: var(--muted); font-size: 12px; }
.problem {
  background: var(--failed-bg); border-radius: 6px; padding: 8px 10px; font-size: 13px; overflow-wrap: anywhere;
}
.card.blocked .problem { background: var(--blocked-bg); }
.problem b { display: block; }
.problem pre, .text pre {
  margin: 6px 0 0; white-space: pre-wrap; overflow-wrap: anywhere; max-height: 160px; overflow: auto;
  font: 12px/1.4 ui-monospace, Menlo, Consolas, monospace;
}
.text { font-size: 13px; color: var(--muted); }
.qa { font-size: 12px; color: var(--muted); overflow-wrap: anywhere; }
.qa.rejected {
  background: var(--rejected-bg); color: var(--fg); border-radius: 6px; padding: 8px 10px; font-size: 13px;
}
.qa.rejected > b { display: block; color: var(--rejected); }
.failed-checks { margin: 4px 0 0; padding-left: 18px; }
.failed-checks small { display: block; color: var(--muted); font-size: 11px; }
.qa p { margin: 6px 0 0; font-size: 12px; color: var(--muted); }
.meta { display: grid; grid-template-columns: repeat(auto-fill, minmax(92px, 1fr)); gap: 4px 10px; margin: 0;
  font-size: 12px; border-top: 1px solid var(--line); padding-top: 8px; }
.meta dt { color: var(--muted); }
.meta dd { margin: 0; font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
.empty { color: var(--muted); padding: 40px 0; text-align: center; }
footer { color: var(--muted); font-size: 12px; margin-top: 24px; text-align: center; }
"""

_JS = """
(function () {
  var buttons = document.querySelectorAll('button[data-filter]');
  var cards = document.querySelectorAll('article.card');
  function apply(filter) {
    buttons.forEach(function (b) { b.setAttribute('aria-pressed', String(b.dataset.filter === filter)); });
    cards.forEach(function (c) { c.hidden = filter !== 'all' && c.dataset.status !== filter; });
  }
  buttons.forEach(function (b) { b.addEventListener('click', function () { apply(b.dataset.filter); }); });
})();
"""

PAGE = Template(
    """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="nanobatch">
<title>$title</title>
<style>"""
    + _CSS
    + """</style>
</head>
<body>
<h1>$title</h1>
<p class="sub">$subtitle</p>
<section class="top">
  <div class="panel"><h2>Totals</h2>$totals</div>
  <div class="panel hist"><h2>Latency (seconds)</h2>$histogram</div>
</section>
<nav class="filters" aria-label="Filter by status">$filters</nav>
<main class="grid">
$cards
</main>
<footer>Generated by nanobatch at $generated</footer>
<script>"""
    + _JS
    + """</script>
</body>
</html>
"""
)
