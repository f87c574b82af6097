"""The finding of a two-step transfer sweep (THTL shape): does the intermediate domain help the target, and does
step-wise fine-tuning (SWFT) beat training the last layer only?

A sweep holds configurations (schedule x initial weights x training fraction), each run over several seeds. Two
configurations are compared by the difference of their mean test metric with a 95 % Welch t-interval: the seeds
of two configurations are independent runs with possibly different spreads, so neither pairing by seed nor a
pooled variance is justified. With 3 seeds a side the interval is wide (t with ~2-4 degrees of freedom): a
difference counts as a difference only when its interval excludes 0, and the sentence says so either way.
"""
from __future__ import annotations

from dataclasses import dataclass

from tltrain.safe_io import markdown_cell
from tltrain.stats import mean_ci, welch_interval  # welch_interval: also importable from here, as before

SCHEDULE_NAMES = {"linear_probe": "last-layer-only", "swft": "SWFT", "finetune_all": "fine-tune-all"}


@dataclass
class Comparison:
    """Configuration a against configuration b on one metric at one training fraction."""

    metric: str
    fraction: float
    a: tuple[str, str]  # (schedule, initial weights) as the report names them, e.g. ("swft", "run:step1")
    b: tuple[str, str]
    n_a: int
    mean_a: float
    ci_a: float | None
    n_b: int
    mean_b: float
    ci_b: float | None
    diff: float
    low: float | None  # the 95 % Welch interval of mean_a - mean_b (None below 2 seeds a side)
    high: float | None

    @property
    def verdict(self) -> str:
        if self.low is None:
            return "undecided (fewer than 2 seeds)"
        if self.low > 0:
            return "higher"
        if self.high < 0:
            return "lower"
        return "no clear difference"

    @property
    def label_a(self) -> str:
        return _label(*self.a)

    @property
    def label_b(self) -> str:
        return _label(*self.b)

    def interval(self) -> str:
        return "no interval (n < 2)" if self.low is None else f"95 % CI [{self.low:+.3f}, {self.high:+.3f}]"


def _values(rows: list[dict], metric: str, schedule: str, weights: str, fraction: float) -> list[float]:
    return [r[metric] for r in rows if r["status"] == "completed" and r.get("schedule") == schedule
            and r.get("weights") == weights and r.get("fraction") == fraction and r.get(metric) is not None]


def _label(schedule: str, weights: str) -> str:
    return f"{SCHEDULE_NAMES.get(schedule, schedule)} from {weights}"


def compare(rows: list[dict], metric: str, fraction: float, a: tuple[str, str], b: tuple[str, str]) \
        -> Comparison | None:
    """a and b are (schedule, initial weights) as the report names them; None when either has no completed run."""
    values_a, values_b = _values(rows, metric, *a, fraction), _values(rows, metric, *b, fraction)
    if not values_a or not values_b:
        return None
    n_a, mean_a, ci_a = mean_ci(values_a)
    n_b, mean_b, ci_b = mean_ci(values_b)
    diff, low, high = welch_interval(values_a, values_b)
    return Comparison(metric, fraction, a, b, n_a, mean_a, ci_a, n_b, mean_b, ci_b, diff, low, high)


def intermediate_weights(rows: list[dict]) -> str | None:
    """The one non-scratch initial weights of a sweep that also has scratch runs (else None: not a THTL sweep)."""
    weights = {r.get("weights") for r in rows if r["status"] == "completed"}
    others = sorted(w for w in weights if w and w != "scratch")
    return others[0] if "scratch" in weights and len(others) == 1 else None


def thtl_comparisons(rows: list[dict], metric: str = "kappa") -> list[Comparison]:
    """Per training fraction: each schedule from the intermediate model against the same schedule from scratch,
    and SWFT against last-layer-only and against fine-tune-all, both from the intermediate model."""
    intermediate = intermediate_weights(rows)
    if intermediate is None:
        return []
    fractions = sorted({r["fraction"] for r in rows if r.get("fraction") is not None})
    pairs = [((s, intermediate), (s, "scratch")) for s in SCHEDULE_NAMES]
    pairs += [(("swft", intermediate), ("linear_probe", intermediate)),
              (("swft", intermediate), ("finetune_all", intermediate))]
    found = [compare(rows, metric, fraction, a, b) for fraction in fractions for a, b in pairs]
    return [c for c in found if c is not None]


def _mean(c_mean: float, c_ci: float | None) -> str:
    return f"{c_mean:.3f}" if c_ci is None else f"{c_mean:.3f} ± {c_ci:.3f}"


def finding_sentence(comparisons: list[Comparison]) -> str | None:
    """One sentence at the smallest fraction that has both questions answered: intermediate vs scratch (SWFT) and
    SWFT vs last-layer-only (both from the intermediate model), each with its interval. The intermediate model's
    name (from a config file) is escaped for Markdown, which also makes it safe to print."""
    for fraction in sorted({c.fraction for c in comparisons}):
        at = [c for c in comparisons if c.fraction == fraction and c.a[0] == "swft"]
        transfer = next((c for c in at if c.b == ("swft", "scratch")), None)
        versus_last = next((c for c in at if c.b == ("linear_probe", c.a[1])), None)
        if transfer is None or versus_last is None:
            continue
        intermediate = markdown_cell(transfer.a[1])  # a run or package name from a config: shown in Markdown
        metric = transfer.metric
        beat = {"higher": "beat", "lower": "fell below", "no clear difference": "did not clearly beat"}.get(
            versus_last.verdict, "could not be compared with")
        helped = {"higher": "raised", "lower": "lowered", "no clear difference": "did not clearly change"}.get(
            transfer.verdict, "could not be compared on")
        return (f"With {fraction * 100:g} % of the target's training images, starting from "
                f"{intermediate} {helped} SWFT's test {metric} "
                f"({_mean(transfer.mean_a, transfer.ci_a)} against {_mean(transfer.mean_b, transfer.ci_b)} from "
                f"scratch; difference {transfer.diff:+.3f}, {transfer.interval()}), and SWFT {beat} last-layer-only "
                f"from the same weights ({_mean(versus_last.mean_a, versus_last.ci_a)} against "
                f"{_mean(versus_last.mean_b, versus_last.ci_b)}; difference {versus_last.diff:+.3f}, "
                f"{versus_last.interval()}; n = {transfer.n_a} seeds per configuration).")
    return None


def comparisons_markdown(comparisons: list[Comparison]) -> str:
    lines = ["| fraction | metric | a | b | mean a | mean b | a - b | 95 % CI of a - b | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        interval = "-" if c.low is None else f"[{c.low:+.3f}, {c.high:+.3f}]"
        a, b = markdown_cell(c.label_a), markdown_cell(c.label_b)  # names from config files
        lines.append(f"| {c.fraction * 100:g} % | {c.metric} | {a} | {b} | {_mean(c.mean_a, c.ci_a)} | "
                     f"{_mean(c.mean_b, c.ci_b)} | {c.diff:+.3f} | {interval} | {c.verdict} |")
    return "\n".join(lines)
