"""What a hostile-load run shows: ITL stats, the JSON result and its checks, the printed table and
PASS/FAIL lines, and the PNG."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from _common import pyplot, write_results

from hostile.common import HEALTH_TARGET_S, HONEST_SPLITS, K_SPLIT, pct
from hostile.watch import Watch


@dataclass
class Run:
    """What the phases of a run gathered."""

    quiet: list[dict]  # honest sessions of the quiet run
    attacked: list[dict]  # the same sessions under attack
    watch: Watch
    report: dict  # the attacker's own report
    device: dict  # the honest device's counters during the attack
    outcomes_before: dict  # the edge's session outcomes before the attack
    outcomes_after: dict
    rss_before: float
    rss_after: float
    times: tuple[float, ...]  # q0, q1 (quiet run), a0, a1 (attack), end: seconds since t0


def summarize(args, edge_flags: list[str], identities: list[str], run: Run, out_json: Path) -> None:
    """The table, the PASS/FAIL lines, the JSON and the PNG."""
    result = build_result(args, edge_flags, identities, run)
    print_table(args, result, run.report)
    print_checks(result)
    write_results(
        out_json, result, lambda png: plot(result, run.quiet, run.attacked, run.watch.samples, png), default=str
    )


# ---------------------------------------------------------------------------------------- the result
def itl_stats(sessions: list[dict]) -> dict:
    gaps = [g for s in sessions for g in s["itl_s"]]
    ttft = [s["ttft_s"] for s in sessions if s["ttft_s"] is not None]
    # how many honest sessions were decoding at once, per gap: fewer at once decode faster, so a run
    # whose sessions got in one by one is not held to the same load as one where all ran together
    spans = [(s["arrivals"][0], s["arrivals"][-1]) for s in sessions if s["arrivals"]]
    mids = [(x + y) / 2 for s in sessions for x, y in pairwise(s["arrivals"])]
    together = [sum(a <= m <= b for a, b in spans) for m in mids]
    return {
        "itl_p50_ms": 1000 * pct(gaps, 50),
        "itl_p99_ms": 1000 * pct(gaps, 99),
        "itl_max_ms": 1000 * max(gaps, default=float("nan")),
        "itl_samples": len(gaps),
        "honest_decoding_at_once_mean": sum(together) / len(together) if together else float("nan"),
        "ttft_median_s": pct(ttft, 50),
        "ttft_max_s": max(ttft, default=float("nan")),
    }


def build_result(args, edge_flags: list[str], identities: list[str], run: Run) -> dict:
    """The JSON result (its keys in the order the file has always had them)."""
    q0, q1, a0, a1, end = run.times
    rows = session_rows(run.quiet, run.attacked)
    qstat, astat = itl_stats(run.quiet), itl_stats(run.attacked)
    health = {"quiet": run.watch.span(q0, q1), "attack": run.watch.span(a0, a1), "whole_run": run.watch.span(0, end)}
    rss = rss_section(run, a0, a1)
    return {
        "benchmark": "hostile_load",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "model": str(args.model),
        "new_tokens": args.new_tokens,
        "codec": args.codec,
        "edge_flags": edge_flags,
        "edge_env": {"COINFER_MALLOC_ARENAS": os.environ.get("COINFER_MALLOC_ARENAS")},
        "client_identities": client_identities(identities),
        "honest_splits": list(HONEST_SPLITS),
        "attacker": attacker_section(args, run.report),
        "attack": {"start_s": a0, "end_s": a1, "seconds": a1 - a0},
        "quiet": qstat,
        "attacked": astat,
        "health": health,
        "rss": rss,
        "timeline": [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in smp.items()} for smp in run.watch.samples[::5]
        ],  # every ~0.5 s
        "edge_outcomes_during_attack": outcomes_delta(run.outcomes_before, run.outcomes_after),
        "honest_device_during_attack": run.device,
        "checks": checks(rows, qstat, astat, health, rss["growth"]),
        "sessions": rows,
    }


def session_rows(quiet: list[dict], attacked: list[dict]) -> list[dict]:
    """Per honest session: quiet and attacked records (no arrival times) and whether the outputs match."""
    return [
        {
            "session": i,
            "split": qs["split"],
            "identical": at["error"] is None and at["tokens"] == qs["tokens"],
            "quiet": {k: v for k, v in qs.items() if k != "arrivals"},
            "attacked": {k: v for k, v in at.items() if k != "arrivals"},
        }
        for i, (qs, at) in enumerate(zip(quiet, attacked, strict=True))
    ]


def rss_section(run: Run, a0: float, a1: float) -> dict:
    """The edge's RSS before the attack, its peak (during it and 5 s after), after it, and the growth."""
    peak = max((s["rss_mib"] for s in run.watch.samples if a0 <= s["t"] <= a1 + 5), default=run.rss_before)
    before = run.rss_before
    return {
        "before_attack_mib": before,
        "peak_attack_mib": peak,
        "after_attack_mib": run.rss_after,
        "growth": run.rss_after / before - 1 if before else float("nan"),
        "peak_growth": peak / before - 1 if before else float("nan"),
    }


def outcomes_delta(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def client_identities(identities: list[str]) -> dict:
    if identities:
        return {
            "tokens": identities,
            "honest": "token <honest> (AgentSettings.edge_token)",
            "attacker": "token <attacker> in every call's metadata",
            "monitor": "token <monitor>: health / Describe / metrics polling",
        }
    return {
        "tokens": [],
        "all": "no tokens: one identity (the loopback address) for honest devices, attacker and monitor",
    }


def attacker_section(args, report: dict) -> dict:
    return {
        "silent": args.silent,
        "open_only": args.open_only,
        "flood_loops": args.flood,
        "poison_loops": args.poison,
        "reopen_seconds": args.attack_reopen_seconds,
        "retry_seconds": args.attack_retry_seconds,
        "lead_seconds": args.attack_lead_seconds,
        "busy_wait_seconds_of_honest_device": args.busy_wait_seconds,
        **report,
    }


def checks(rows: list[dict], qstat: dict, astat: dict, health: dict, growth: float) -> dict:
    """The targets: identical outputs, p99 ITL <= 2x quiet, RSS after <= +10%, health answered < 1 s."""
    ha, hall = health["attack"], health["whole_run"]
    return {
        "identical_output": all(r["identical"] for r in rows),
        "itl_p99_within_2x": astat["itl_p99_ms"] <= 2 * qstat["itl_p99_ms"],
        "rss_growth_within_10pct": growth <= 0.10,
        "health_and_describe_answered": hall["failures"] == 0
        and max(ha["health_max_ms"], ha["describe_max_ms"]) < 1000 * HEALTH_TARGET_S,
    }


# ---------------------------------------------------------------------------------------- the table
def print_table(args, result: dict, report: dict) -> None:
    print_setup(args, result)
    print_sessions(result["sessions"])
    print_measures(result)
    print_attack(report)
    print(f"edge session outcomes during the attack: {result['edge_outcomes_during_attack']}")
    print(f"honest device during the attack: {result['honest_device_during_attack']}")


def print_setup(args, result: dict) -> None:
    identities, attack = result["client_identities"]["tokens"], result["attack"]
    print(
        f"\nhostile load on {os.cpu_count()} CPUs (loopback, one edge process, attacker in its own process); "
        f"edge flags: {' '.join(result['edge_flags'])}"
        + (
            f" (client identities: {', '.join(identities)})"
            if identities
            else " (no tokens: honest devices and attacker are one client identity)"
        )
    )
    print(
        f"attacker: {args.silent} silent, {args.open_only} Open-only, {args.flood} maximal-Open flood, "
        f"{args.poison} NaN/huge-frame loops for {attack['end_s'] - attack['start_s']:.0f} s "
        f"(honest sessions started {args.attack_lead_seconds:.0f} s in)"
    )


def print_sessions(rows: list[dict]) -> None:
    print(
        f"{'#':>2}{'k':>4}{'TTFT quiet s':>14}{'TTFT attack s':>15}{'busy retries':>14}{'replays':>9}"
        f"{'ITL p99 quiet ms':>18}{'attack ms':>11}  output"
    )
    for r in rows:
        q, a = r["quiet"], r["attacked"]
        ttft_a = f"{a['ttft_s']:.2f}" if a["ttft_s"] is not None else "-"
        status = (
            "identical"
            if r["identical"]
            else (f"FAILED: {a['error'][:60]}" if a["error"] else f"DIFFERS ({len(a['tokens'])} tokens)")
        )
        if a.get("local_fallback"):
            status += " (finished on the device)"
        print(
            f"{r['session']:>2}{r['split']:>4}{q['ttft_s'] or float('nan'):>14.2f}{ttft_a:>15}"
            f"{a.get('busy_retries', '-'):>14}{a.get('replays', '-'):>9}"
            f"{1000 * pct(q['itl_s'], 99):>18.0f}{1000 * pct(a['itl_s'], 99):>11.0f}  {status}"
        )


def print_measures(result: dict) -> None:
    """ITL and TTFT over all honest gaps, health / Describe latency, the edge's RSS."""
    qstat, astat, rss = result["quiet"], result["attacked"], result["rss"]
    hq, ha, hall = result["health"]["quiet"], result["health"]["attack"], result["health"]["whole_run"]
    print(
        f"all honest gaps: ITL p50 / p99 / max  quiet {qstat['itl_p50_ms']:.0f} / {qstat['itl_p99_ms']:.0f} / "
        f"{qstat['itl_max_ms']:.0f} ms, attacked {astat['itl_p50_ms']:.0f} / {astat['itl_p99_ms']:.0f} / "
        f"{astat['itl_max_ms']:.0f} ms (honest sessions decoding at once, mean over gaps: quiet "
        f"{qstat['honest_decoding_at_once_mean']:.1f}, attacked {astat['honest_decoding_at_once_mean']:.1f}); "
        f"TTFT median quiet {qstat['ttft_median_s']:.2f} s, attacked {astat['ttft_median_s']:.2f} s "
        f"(max {astat['ttft_max_s']:.2f} s)"
    )
    print(
        f"health / Describe: quiet max {hq['health_max_ms']:.0f} / {hq['describe_max_ms']:.0f} ms; attack max "
        f"{ha['health_max_ms']:.0f} / {ha['describe_max_ms']:.0f} ms (p99 {ha['health_p99_ms']:.0f} / "
        f"{ha['describe_p99_ms']:.0f}), {ha['polls']} polls, longest gap {ha['longest_poll_gap_ms']:.0f} ms; "
        f"failures {hall['failures']} {hall['failure_examples'][:2] if hall['failures'] else ''}"
    )
    print(
        f"edge RSS: {rss['before_attack_mib']:.0f} MiB before the attack, peak {rss['peak_attack_mib']:.0f} "
        f"({rss['peak_growth']:+.1%}), {rss['after_attack_mib']:.0f} MiB after it ({rss['growth']:+.1%})"
    )


def print_attack(report: dict) -> None:
    """What the attacker got, per kind of stream, or its report as it is when it has no tally."""
    if "tally" not in report:
        print(f"attacker: {report}")
        return
    print(f"{'attack':>22}{'streams':>9}{'opened':>8}{'ended by edge':>15}{'held med s':>12}{'held max s':>12}  codes")
    for name, t in sorted(report["tally"].items()):
        print(
            f"{name:>22}{t['streams']:>9}{t['opened']:>8}{t['held_by_edge']:>15}{t['held_median_s']:>12.2f}"
            f"{t['held_max_s']:>12.2f}  {t['codes']}"
        )
    print(
        f"flood: {report['flood']['bytes_sent'] / 2**20:.0f} MiB of maximal Opens (sizes "
        f"{report['flood']['sizes']}); poison: {report['poison']['frames_sent']} bad Step frames sent, "
        f"{report['poison']['tokens_back']} tokens back to poisoned sessions"
    )


def print_checks(result: dict) -> None:
    checks, rows, rss = result["checks"], result["sessions"], result["rss"]
    qstat, astat = result["quiet"], result["attacked"]
    ha, hall = result["health"]["attack"], result["health"]["whole_run"]
    print(
        f"{'PASS' if checks['identical_output'] else 'FAIL'}  every honest session finishes with the quiet "
        f"run's output ({sum(r['identical'] for r in rows)}/{len(rows)})"
    )
    print(
        f"{'PASS' if checks['itl_p99_within_2x'] else 'FAIL'}  honest p99 ITL {astat['itl_p99_ms']:.0f} ms <= 2x "
        f"quiet {qstat['itl_p99_ms']:.0f} ms (with {astat['honest_decoding_at_once_mean']:.1f} vs "
        f"{qstat['honest_decoding_at_once_mean']:.1f} honest sessions decoding at once)"
    )
    print(f"{'PASS' if checks['rss_growth_within_10pct'] else 'FAIL'}  edge RSS growth {rss['growth']:+.1%} <= +10%")
    print(
        f"{'PASS' if checks['health_and_describe_answered'] else 'FAIL'}  health and Describe answered throughout "
        f"({hall['failures']} failures, attack max {max(ha['health_max_ms'], ha['describe_max_ms']):.0f} ms "
        f"< {1000 * HEALTH_TARGET_S:.0f} ms)"
    )


# ---------------------------------------------------------------------------------------- the PNG
def plot(result: dict, quiet: list[dict], attacked: list[dict], watch: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    a0, a1 = result["attack"]["start_s"], result["attack"]["end_s"]
    plot_itl(axes[0], quiet, attacked)
    plot_memory(axes[1], result, watch, a0, a1)
    plot_health(axes[2], watch, a0, a1)
    who = (
        "per-device tokens, per-client limits"
        if result["client_identities"]["tokens"]
        else "no tokens: one client identity for all"
    )
    fig.suptitle(f"Hostile load: 8 honest sessions vs silent, Open-only, maximal-Open and NaN streams ({who})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_itl(ax, quiet: list[dict], attacked: list[dict]) -> None:
    """The CDF of honest inter-token gaps, quiet and attacked, per split."""
    for name, sessions, color in (("quiet", quiet, "tab:blue"), ("attacked", attacked, "tab:red")):
        for k, ls in ((0, "-"), (K_SPLIT, "--")):
            gaps = sorted(1000 * g for s in sessions if s["split"] == k for g in s["itl_s"])
            if gaps:
                ax.plot(
                    gaps, [(i + 1) / len(gaps) for i in range(len(gaps))], ls=ls, color=color, label=f"{name}, k={k}"
                )
    ax.set_xscale("log")
    ax.set_xlabel("honest inter-token latency (ms)")
    ax.set_ylabel("fraction of gaps")
    ax.set_title("ITL distribution (CDF)")
    ax.legend(fontsize=8)


def plot_memory(ax, result: dict, watch: list[dict], a0: float, a1: float) -> None:
    """The edge's RSS over time, with the sessions it holds on a second axis."""
    ax.plot([s["t"] for s in watch], [s["rss_mib"] for s in watch], label="edge RSS (MiB)")
    ax.axhline(result["rss"]["before_attack_mib"] * 1.1, color="k", ls="--", lw=0.8, label="before attack + 10%")
    ax.axvspan(a0, a1, color="tab:red", alpha=0.12, label="attack")
    ax2 = ax.twinx()
    ax2.plot(
        [s["t"] for s in watch if s["sessions"] is not None],
        [s["sessions"] for s in watch if s["sessions"] is not None],
        color="tab:orange",
        alpha=0.6,
        lw=0.8,
        label="sessions held",
    )
    ax2.set_ylabel("sessions held (Describe)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_title("edge memory and session slots")
    ax.legend(loc="lower right", fontsize=8)


def plot_health(ax, watch: list[dict], a0: float, a1: float) -> None:
    """Health Check and Describe latency over time, failures marked."""
    for key, label in (("health_s", "health Check"), ("describe_s", "Describe")):
        pts = [(s["t"], 1000 * s[key]) for s in watch if s[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.8, label=label)
    fails = [s["t"] for s in watch if s["health_s"] is None or s["describe_s"] is None]
    if fails:
        ax.plot(fails, [1000 * HEALTH_TARGET_S] * len(fails), "kx", label="failed")
    ax.axvspan(a0, a1, color="tab:red", alpha=0.12, label="attack")
    ax.set_yscale("log")
    ax.set_xlabel("seconds")
    ax.set_ylabel("ms")
    ax.set_title("health and Describe latency (every ~100 ms)")
    ax.legend(fontsize=8)
