"""Experiment (not a fix): xmlio.parse on the C-accelerated expat parser when the input has no
'<!' and no '<?' (so no DTD, comment, PI, CDATA or XML declaration can be in it); anything
else still goes through the defusedxml path, which gives the exact errors.

    BENCH_SERVER_PATCH=bench/experiments/fast_parse.py scripts/bench --only messages

Measured effect: see bench/README.md (WebSocket message CPU -23%, BOSH -5%).
"""
import xml.etree.ElementTree as _ET

from boshroster import xmlio as _xmlio  # bosh.py, web.py, websocket.py call xmlio.parse through the module

_slow_parse = _xmlio.parse


def _fast_parse(data, max_size):
    if isinstance(data, str):
        data = data.encode("utf-8")
    if len(data) > max_size or b"<!" in data or b"<?" in data:
        return _slow_parse(data, max_size)
    parser = _ET.XMLParser()
    try:
        parser.feed(data)
        return parser.close()
    except _ET.ParseError:
        return _slow_parse(data, max_size)  # same error text as before


_xmlio.parse = _fast_parse
