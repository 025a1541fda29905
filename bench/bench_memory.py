"""Idle memory of the bot against aiogram's own import floor, each in a fresh interpreter.

Run from the repo root::

    .venv/bin/python -m bench.bench_memory [--runs 3]

Three kinds of process, each started `--runs` times (the median shown), report their resident
set (VmRSS, and the peak VmHWM) once they are idle:

* **floor**: a process that only runs `import aiogram`;
* **bot idle**: `CallbotApp` built and started as `python -m bot` does (settings, the schema,
  the web app listening, the on-call timer), then left idle for 2 s; no Telegram or Pilot
  Status request is made, so no fake is needed. Twice on one SQLite database: the first start
  migrates it, the second (every restart after) finds it at head; the target is about that one;
* the modules the idle bot has loaded that only some paths need (Alembic, Babel's catalogue
  tools, PyAV, aiortc, numpy), to show they stay out until their path runs.

bench/README.md shows the output. Nothing is asserted; the target is printed next to the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

TARGET_ABOVE_FLOOR_MIB = 20.0
LAZY = ("alembic", "mako", "babel.messages", "av", "aiortc", "numpy", "aioice", "pylibsrtp")

_STATUS = """
def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields
"""

FLOOR = (
    _STATUS
    + """
import json, sys
import aiogram
print(json.dumps({**status(), "modules": len(sys.modules)}))
"""
)

BOT = (
    _STATUS
    + """
import asyncio, json, sys
LAZY = sys.argv[2].split(",")

async def main(data_dir):
    from bot.app import CallbotApp
    from tests.idle import idle_settings

    settings = idle_settings(data_dir)
    app = CallbotApp(settings)
    await app.start()
    try:
        await asyncio.sleep(2)
        loaded = sorted(m for m in LAZY if m in sys.modules)
        print(json.dumps({**status(), "modules": len(sys.modules), "lazy_loaded": loaded}))
    finally:
        await app.close()

asyncio.run(main(sys.argv[1]))
"""
)


def run(code: str, *args: str) -> dict[str, object]:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
        env=env,
        timeout=120,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def median(rows: Sequence[dict[str, object]], key: str) -> float:
    return statistics.median(float(row[key]) for row in rows)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="processes of each kind")
    args = parser.parse_args(argv)
    import aiogram  # only for its version

    floors: list[dict[str, object]] = []
    firsts: list[dict[str, object]] = []
    bots: list[dict[str, object]] = []
    for _ in range(args.runs):  # interleaved: the machine's load hits all alike
        floors.append(run(FLOOR))
        with tempfile.TemporaryDirectory(prefix="callbot-mem-") as data_dir:
            firsts.append(run(BOT, data_dir, ",".join(LAZY)))  # migrates the fresh database
            bots.append(run(BOT, data_dir, ",".join(LAZY)))  # a restart: the schema is at head
    floor, idle = median(floors, "VmRSS"), median(bots, "VmRSS")
    above = idle - floor
    print(
        f"callbot memory bench: Python {platform.python_version()}, aiogram {aiogram.__version__}, "
        f"{os.cpu_count()} CPUs; median of {args.runs} fresh processes each"
    )
    print()
    print(f"  {'process':<40} {'RSS MiB':>9} {'peak MiB':>9} {'modules':>8}")
    kinds = (
        ("floor: import aiogram", floors),
        ("bot idle, first start (migrates)", firsts),
        ("bot idle, restarted (schema at head)", bots),
    )
    for label, rows in kinds:
        print(
            f"  {label:<40} {median(rows, 'VmRSS'):>9.1f} {median(rows, 'VmHWM'):>9.1f}"
            f" {median(rows, 'modules'):>8.0f}"
        )
    print(f"  {'bot idle (restarted) - floor':<40} {above:>+9.1f}")
    print()
    verdict = "PASS" if above <= TARGET_ABOVE_FLOOR_MIB else "MISS"
    print(
        f"target: bot idle <= floor + {TARGET_ABOVE_FLOOR_MIB:g} MiB: {above:+.1f} MiB -> {verdict}"
    )
    loaded = sorted({m for row in bots for m in row["lazy_loaded"]})  # type: ignore[attr-defined]
    print(f"loaded while idle, of {', '.join(LAZY)}: {', '.join(loaded) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
