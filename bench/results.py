"""Results of a bench run: JSON lines, the normalization of CPU figures, the table, --compare.

Each figure is a row (``Results.add``); ``finalize`` divides server CPU figures by the probe's
slow-down and writes the final rows.  A row carries the server it was measured on
(``server``: boshroster, or a peer such as ejabberd); the table prints boshroster's figures with
their ratios to the ceilings, to the Prosody reference and to the peer measured in the same run.
"""

from __future__ import annotations

import json
import os
import re
import statistics

# Prosody 0.12 + mod_http_roster_admin on this machine kind: design notes F (issue 5) and, where issue 12
# measured it with the same generator as ejabberd, the lower of the two figures.
_LOGIN_CPU = {"ws": 3.3e-3, "bosh": 5.3e-3}
REFERENCE = {
    ("login", "seq_cpu_per_login"): _LOGIN_CPU,
    ("login", "conc_cpu_per_login"): _LOGIN_CPU,
    ("login", "seq_p50"): {"ws": 10.8e-3},  # issue 12
    ("idle", "rss_per_session"): {"ws": 40.0, "bosh": 55.0},  # KiB
    ("messages", "cpu_per_1000"): {"ws": 0.056, "bosh": 0.076},
    ("refresh", "reply_time"): {"ws": 0.274, "bosh": 0.274},  # issue 12 (design notes: 0.430)
    ("refresh", "all_pushed_time"): {"ws": 0.430, "bosh": 0.430},
    ("refresh", "backend_gets"): {"ws": 200, "bosh": 200},
    ("refresh", "cpu_per_user"): {"ws": 1.15e-3, "bosh": 1.15e-3},  # issue 12
    ("refresh", "single_p50"): {"ws": 36.7e-3, "bosh": 36.7e-3},  # issue 12
    ("refresh", "single_backend_gets"): {"ws": 400, "bosh": 400},
    ("presence", "cpu_per_fanout"): {"ws": 6.8e-3, "bosh": 43.4e-3},  # BOSH: issue 12
}
# Issue 5's ceiling targets: server CPU per message at most this many bare ceiling operations.
CEILING_TARGET = {("messages", "cpu_per_1000", "ws"): 1.6, ("messages", "cpu_per_1000", "bosh"): 1.0}
SELF = "boshroster"


def is_cost(row: dict) -> bool:
    """A CPU-per-operation or memory figure (issue 12's done-when compares these)."""
    return row["lower_is_better"] and (row["unit"] == "KiB" or (row["unit"] in ("s", "%core") and "cpu" in row["metric"]))


class Results:
    """``server`` names who is measured right now (the runner switches it to a peer's name while the
    workloads run against the peer); every row records it."""

    def __init__(self, path: str, meta: dict):
        self.path = path
        self.rows: list[dict] = []
        self.server = SELF
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.fh = open(path, "w")
        self._write({"type": "meta", **meta})

    def _write(self, obj: dict) -> None:
        self.fh.write(json.dumps(obj) + "\n")
        self.fh.flush()

    def add(self, workload: str, transport: str, metric: str, value, unit: str, label: str,
            ceiling: float | None = None, ceiling_label: str = "", meter: dict | None = None,
            lower_is_better: bool = True, note: str = "", extra: dict | None = None,
            ceiling_probe: float | None = None) -> None:
        ref = REFERENCE.get((workload, metric), {}).get(transport) if self.server == SELF else None
        row = {
            "type": "live", "server": self.server, "workload": workload, "transport": transport, "metric": metric,
            "label": label, "value": value, "unit": unit,
            "ceiling": ceiling, "ceiling_label": ceiling_label,
            "ratio_ceiling": (value / ceiling) if (ceiling and ceiling > 1e-9 and value is not None) else None,
            "reference": ref, "ratio_reference": (value / ref) if (ref and value is not None) else None,
            "lower_is_better": lower_is_better, "note": note,
        }
        target = CEILING_TARGET.get((workload, metric, transport))
        if target is not None:
            row["ceiling_target"] = target
        if "cpu" in metric and unit in ("s", "%core") and meter is not None and meter.get("probe"):
            row["normalize"] = True
            row["probe"] = meter["probe"]
            row["ceiling_probe"] = ceiling_probe
        if meter is not None:
            row["gen_share"] = round(meter["gen_share"], 3)
            row["server_share"] = round(meter["server_share"], 3)
            row["other_share"] = round(meter["other_share"], 3)
            row["meter"] = {k: round(v, 6) if isinstance(v, float) else v for k, v in meter.items()}
        if extra:
            row.update(extra)
        self.rows.append(row)
        self._write(row)
        print("  " + format_row(row), flush=True)

    def finalize(self, baseline: float | None) -> None:
        """Server CPU figures at the machine's undisturbed speed: value x baseline / probe time
        during the measurement (baseline: the probe's 5th percentile over the whole run).  The raw
        figure stays in ``value_raw``; these final rows are written with type "figure"."""
        for row in self.rows:
            row["type"] = "figure"
            if baseline and row.get("normalize") and row["value"] is not None:
                slow = row["probe"] / baseline
                row["slow"] = round(slow, 3)
                row["value_raw"] = row["value"]
                row["value"] = row["value"] / slow
                if row["ceiling"] and row.get("ceiling_probe"):
                    row["ceiling_raw"] = row["ceiling"]
                    row["ceiling"] = row["ceiling"] * baseline / row["ceiling_probe"]
                if row["ceiling"] and row["ceiling"] > 1e-9:
                    row["ratio_ceiling"] = row["value"] / row["ceiling"]
                if row["reference"]:
                    row["ratio_reference"] = row["value"] / row["reference"]
        peers = {(row["workload"], row["transport"], row["metric"]): row for row in self.rows if row["server"] != SELF}
        for row in self.rows:
            other = peers.get((row["workload"], row["transport"], row["metric"])) if row["server"] == SELF else None
            # no ratio to a figure that is ~0 (an idle WebSocket server's CPU): it would say nothing
            tiny = other is not None and other["unit"] == "%core" and (other["value"] or 0) < 0.005
            if other is not None and other["value"] and not tiny and row["value"] is not None:
                row["peer"] = other["server"]
                row["peer_value"] = other["value"]
                row["ratio_peer"] = row["value"] / other["value"]
                if row.get("value_raw") is not None and other.get("value_raw"):
                    row["ratio_peer_raw"] = row["value_raw"] / other["value_raw"]
            self._write(row)

    def close(self) -> None:
        self.fh.close()


def fmt_value(value, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        if abs(value) < 1e-3:
            return f"{value * 1e6:.3g} µs"
        v = value * 1e3
        return f"{v:.3g} ms" if v < 100 else f"{v:,.0f} ms"
    if unit == "%core":
        return f"{value * 100:.2f} %core"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f} {unit}".strip()
        return f"{value:.3g} {unit}".strip()
    return f"{value:,} {unit}".strip()


def fmt_ratio(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def format_row(row: dict) -> str:
    gen = row.get("gen_share")
    gen_s = "" if gen is None else f"gen {gen * 100:.0f}%"
    other = row.get("other_share")
    if other is not None and other > 0.1:
        gen_s += f" (others {other * 100:.0f}%)"
    flag = " GEN-BOUND" if gen is not None and gen > 0.85 else ""
    if row.get("slow"):
        ref_raw = f" = {row['value_raw'] / row['reference']:.2f}x ref" if row.get("reference") else ""
        gen_s += f" [raw {fmt_value(row['value_raw'], row['unit'])}{ref_raw}, CPU slow x{row['slow']:.2f}]"
    peer = ""
    if row.get("peer"):
        peer = f"  {row['peer'][:2]} {fmt_ratio(row['ratio_peer']):>7}"
    elif row.get("with_peer"):
        peer = f"  {row['with_peer'][:2]} {'-':>7}"
    server = "" if row.get("server", SELF) == SELF else f"[{row['server']}] "
    return (f"{row['workload']:<9} {row['transport']:<5} {server + row['label']:<38} "
            f"{fmt_value(row['value'], row['unit']):>16}"
            f"  ceil {fmt_ratio(row['ratio_ceiling']):>8}  ref {fmt_ratio(row['ratio_reference']):>7}{peer}  {gen_s}{flag}"
            f"{('  ' + row['note']) if row['note'] else ''}")



_RE_LINE = re.compile(r":\d+\)$")
_GENERIC = ("WSGIServer.handle", "_handle_and_close_when_done", "WSGIHandler.handle ", "ServerHandler.handle ",
            "WSGIHandler.handle_one_request", "WSGIHandler.handle_one_response", "WebSocketHandler.run_application",
            "<module>", "main (", "run (", "serve_forever")


def print_profile(path: str, top: int = 20) -> None:
    """Self and inclusive sample counts per function from py-spy's collapsed stacks."""
    selfc: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    try:
        with open(path) as fh:
            for line in fh:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not stack:
                    continue
                n = int(count)
                total += n
                # "func (path/file.py:123)" -> "func (file.py)": per function, not per line
                frames = [_RE_LINE.sub(")", f) for f in stack.split(";")]
                selfc[frames[-1]] = selfc.get(frames[-1], 0) + n
                for f in set(frames):
                    incl[f] = incl.get(f, 0) + n
    except (OSError, ValueError):
        print(f"  profile: cannot read {path}")
        return
    if not total:
        return
    print(f"  profile {os.path.basename(path)}: {total} samples; top self / inclusive:")
    for f, n in sorted(selfc.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    self {100 * n / total:5.1f}%  {f}")
    shown = 0
    for f, n in sorted(incl.items(), key=lambda kv: -kv[1]):
        if any(g in f for g in _GENERIC):
            continue
        print(f"    incl {100 * n / total:5.1f}%  {f}")
        shown += 1
        if shown >= top:
            break



# -- table, compare ------------------------------------------------------------------------------------

def print_table(rows: list[dict], meta: dict) -> None:
    peer = meta.get("peer") or ""
    own = [row for row in rows if row.get("server", SELF) == SELF]
    others = [row for row in rows if row.get("server", SELF) != SELF]
    if peer:
        for row in own:
            row["with_peer"] = peer
    print()
    print(f"boshroster bench {meta['started']} on {meta['machine']} ({meta['profile']}, git {meta['git']})")
    head = (f"{'workload':<9} {'tr':<5} {'figure':<38} {'value':>16}  {'vs ceiling':>13}  {'vs reference':>12}"
            + (f"  {'vs ' + peer[:8]:>10}" if peer else "") + "  gen CPU")
    print(head)
    print("-" * len(head))
    for row in own:
        print(format_row(row))
    if others:
        print()
        print(f"the peer, same run, same generator ({peer}):")
        for row in others:
            print(format_row(row))
    print()
    print("vs ceiling: value / the same figure on the bare gevent server (pywsgi for BOSH, gevent-websocket echo for"
          " WebSocket);\nvs reference: value / Prosody 0.12 (design notes F, issue 12); gen CPU: the load generator's"
          " share of one core (GEN-BOUND: > 85%,\nthe figure is a floor); others: CPU used by processes not ours (noise).\n"
          "Server CPU figures are at the CPU's undisturbed speed: raw CPU divided by how much slower a fixed probe loop"
          " ran on\nthe server's CPU during the same interval than its 5th percentile over the run"
          f" ({(meta.get('probe_baseline') or 0) * 1e3:.2f} ms); the raw figure is shown too.")
    if peer:
        print(f"vs {peer}: value / the same figure measured on {peer} in this run (both normalized the same way).")
    figures = {(row["workload"], row["transport"], row["metric"]): row for row in own}
    for (workload, transport, metric), off in figures.items():
        on = figures.get((workload, transport, metric[: -len("_archive_off")])) if metric.endswith("_archive_off") else None
        if on is not None and on["value"] and off["value"]:
            ratio = on["value"] / off["value"]
            raw = (f", raw {on['value_raw'] / off['value_raw']:.2f}x" if on.get("value_raw") and off.get("value_raw")
                   else "")
            print(f"archive {workload}/{transport}: CPU per 1,000 with the archive on / off = {ratio:.2f}x{raw}"
                  f" (issue 11 target <= 1.3x): {'met' if ratio <= 1.3 else 'MISSED'}")
    targets = [row for row in own if row.get("ceiling_target") and row.get("ratio_ceiling") is not None]
    for row in targets:
        ok = row["ratio_ceiling"] <= row["ceiling_target"]
        print(f"target {row['workload']}/{row['transport']} {row['metric']}: {row['ratio_ceiling']:.2f}x ceiling "
              f"(target <= {row['ceiling_target']}x): {'met' if ok else 'MISSED'}")
    for row in own:
        if row.get("ratio_reference") is not None and row["lower_is_better"] and row["ratio_reference"] > 1.0:
            print(f"reference MISSED: {row['workload']}/{row['transport']} {row['label']}: "
                  f"{row['ratio_reference']:.2f}x Prosody")
    for row in own:
        if row.get("ratio_peer") is not None and is_cost(row) and row["ratio_peer"] > 1.0:
            print(f"{row['peer']} MISSED: {row['workload']}/{row['transport']} {row['label']}: "
                  f"{row['ratio_peer']:.2f}x {row['peer']}")


def compare(paths: list[str]) -> int:
    figures: dict[tuple, list] = {}
    ratios: dict[tuple, list] = {}
    for path in paths:
        with open(path) as fh:
            for line in fh:
                row = json.loads(line)
                if row.get("type") != "figure" or row.get("value") is None:
                    continue
                key = (row.get("server", SELF), row["workload"], row["transport"], row["metric"], row["label"],
                       row["unit"])
                figures.setdefault(key, []).append(row["value"])
                if row.get("ratio_peer") is not None:
                    ratios.setdefault(key, []).append(row["ratio_peer"])
    print(f"{len(paths)} runs: median, and the largest deviation from it (CPU-per-operation figures marked *);"
          " vs peer: median of the per-run ratios")
    worst = 0.0
    for key, values in figures.items():
        server, wl, tr, metric, label, unit = key
        med = statistics.median(values)
        dev = max(abs(v - med) for v in values) / abs(med) if med else 0.0
        cpu_op = unit == "s" and ("cpu" in metric)
        if cpu_op and server == SELF:
            worst = max(worst, dev)
        vals = ", ".join(fmt_value(v, unit) for v in values)
        shown = label if server == SELF else f"[{server}] {label}"
        vs = f"  vs peer {statistics.median(ratios[key]):.2f}x" if key in ratios else ""
        print(f"{'*' if cpu_op else ' '} {wl:<9} {tr:<5} {shown:<44} median {fmt_value(med, unit):>14}"
              f"  ±{dev * 100:5.1f}%{vs}  [{vals}]")
    print(f"largest deviation of a boshroster CPU-per-operation figure from its median: ±{worst * 100:.1f}%")
    return 0
