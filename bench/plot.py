"""Draw docs/latency.png from bench/results/latency.json: per scenario, the CDF of the
worker's reset latency next to Redis's own expiry lag, on a log time axis.

Reference events that never arrived within the cap keep their CDF below 1 (the curve is
over all keys, not only the ones that arrived). Needs matplotlib (the ``bench`` extra):

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python -m bench.plot
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import RESULTS_DIR, ROOT

OUT = ROOT / "docs" / "latency.png"


def _cdf(values: list[float], total: int) -> tuple[list[float], list[float]]:
    xs = sorted(max(v, 0.01) for v in values)  # log axis: clamp to 10 us
    ys = [(i + 1) / total for i in range(len(xs))]
    return xs, ys


def plot(results: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = results["scenarios"]
    target = results["params"]["target_p99_ms"]
    fig, axes = plt.subplots(
        1, len(scenarios), figsize=(5.2 * len(scenarios), 4.2), sharey=True, squeeze=False
    )
    for ax, s in zip(axes[0], scenarios, strict=True):
        n = s["keys_per_side"]
        wx, wy = _cdf(s["raw"]["worker_latency_ms"], n)
        rx, ry = _cdf(s["raw"]["reference_latency_ms"], n)
        ax.step(
            wx,
            wy,
            where="post",
            color="tab:blue",
            lw=2,
            label=f"worker reset POST (p99 {s['worker']['latency_ms']['p99']:.1f} ms)",
        )
        missing = s["reference"]["never_arrived"]
        label = "Redis's own expired event"
        if missing:
            label += f" ({missing}/{n} never, cap {s['cap_after_last_deadline_s']:.0f} s)"
        ax.step(rx, ry, where="post", color="tab:red", lw=2, label=label)
        if missing:
            cap_ms = s["cap_after_last_deadline_s"] * 1000
            ax.axvline(cap_ms, color="tab:red", ls=":", lw=1)
        ax.axvline(target, color="gray", ls="--", lw=1)
        ax.text(target * 1.1, 0.03, f"{target:.0f} ms target", color="gray", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(0.5, 120_000)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{s['other_keys']:,} other keys with a 1 h TTL")
        ax.set_xlabel("delay after the key's TTL deadline (ms, log scale)")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(loc="upper left", fontsize=8)
    axes[0][0].set_ylabel(f"fraction of the {scenarios[0]['keys_per_side']} keys")
    fig.suptitle(
        "Reset latency vs Redis expiry lag (TTLs 0.5-5 s, Redis "
        f"{results['machine']['redis_server'].split()[2].removeprefix('v=')}, "
        f"{results['machine']['cpus']} cores)"
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "latency.json")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    out = plot(json.loads(args.results.read_text()), args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
