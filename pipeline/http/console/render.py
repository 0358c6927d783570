"""The console's HTML: Jinja2 templates shipped in the package, a sparkline, form parsing.

Every page is rendered on the server and works without JavaScript; nothing is
loaded from another origin, which the Content-Security-Policy sent with each page
also enforces (styles are inline in the base template, there is no script).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from pipeline.errors import NO_VALUE, FieldProblem, ValidationError

__all__ = ["SPARK_HOURS", "page", "parse_form", "sparkline"]

SPARK_HOURS = 24  # hours a group's sparkline covers, ending with the current hour
SPARK_BAR_PX = 4  # width of one hour's bar in the sparkline
SPARK_HEIGHT_PX = 20  # height of the sparkline
FORM_MAX_BYTES = 64 * 1024  # largest console form body read
SECURITY_HEADERS = {
    # same origin only; inline <style> in the base template, no script at all
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "img-src 'self' data:; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",  # confirmation forms must not be framed (clickjacking)
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",  # record pages hold payloads: keep them out of caches
    "X-Content-Type-Options": "nosniff",
}


def _when(value: datetime | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _pretty(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


def _query(params: Mapping[str, Any], **changes: Any) -> str:
    merged = {k: v for k, v in {**params, **changes}.items() if v not in (None, "")}
    return urllib.parse.urlencode(merged)


_env = Environment(loader=PackageLoader("pipeline.http.console", "templates"),
                   autoescape=select_autoescape(default=True, default_for_string=True))
_env.filters.update(when=_when, pretty=_pretty)
_env.globals.update(query=_query)


def page(template: str, status: int = 200, **context: Any) -> HTMLResponse:
    """``template`` rendered with ``context``, with the console's security headers."""
    html = _env.get_template(template).render(**context)
    return HTMLResponse(html, status, headers=SECURITY_HEADERS)


def sparkline(per_hour: Mapping[datetime, int], now: datetime | None = None) -> Markup:
    """An inline SVG bar chart of the last :data:`SPARK_HOURS` hours' counts."""
    end = (now or datetime.now(UTC)).replace(minute=0, second=0, microsecond=0)
    hours = [end - timedelta(hours=SPARK_HOURS - 1 - i) for i in range(SPARK_HOURS)]
    counts = [per_hour.get(h, 0) for h in hours]
    top = max(counts) or 1
    bars = []
    for i, n in enumerate(counts):
        if n:
            h = max(1, round(n / top * SPARK_HEIGHT_PX))
            bars.append(f'<rect x="{i * SPARK_BAR_PX}" y="{SPARK_HEIGHT_PX - h}" '
                        f'width="{SPARK_BAR_PX - 1}" height="{h}"/>')
    label = f"{sum(counts)} in the last {SPARK_HOURS} h, at most {max(counts)} an hour"
    return Markup(f'<svg class="spark" role="img" width="{SPARK_BAR_PX * SPARK_HOURS}" '
                  f'height="{SPARK_HEIGHT_PX}" aria-label="{label}"><title>{label}</title>'
                  f'<line x1="0" y1="{SPARK_HEIGHT_PX - 0.5}" x2="{SPARK_BAR_PX * SPARK_HOURS}" '
                  f'y2="{SPARK_HEIGHT_PX - 0.5}"/>{"".join(bars)}</svg>')


def parse_form(body: bytes) -> dict[str, str]:
    """A urlencoded form's fields (the last value of a repeated one)."""
    if len(body) > FORM_MAX_BYTES:
        raise ValidationError([FieldProblem("form", NO_VALUE, f"over {FORM_MAX_BYTES} bytes")])
    return dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"),
                                       keep_blank_values=True))
