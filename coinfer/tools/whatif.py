"""`coinfer plan`: what would the partitioner choose on a given link? Offline, with a table and a PNG.

The device profile is this host's (measured once, cached), optionally slowed down; the
edge profile is fetched from a running edge (`--edge`) or assumed to be this host's too. The planner
and energy flags are the device agent's own (generated from the same settings groups), read from
the command line only: a what-if does not take the environment's word for them.
"""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import ValidationError

from coinfer.config_values import split_list
from coinfer.planning import partitioner as part
from coinfer.planning.cost_profile import CostProfile
from coinfer.planning.settings import EnergySettings, PlannerSettings, objective_of
from coinfer.settings_cli import add_group_flags, group_from_args, validation_message
from coinfer.tools.shaper import parse_duration, parse_rate


def build_parser() -> argparse.ArgumentParser:
    from coinfer.model.prepare import DEFAULT_MODEL_DIR
    from coinfer.profile import DEFAULT_PROFILE_DIR

    ap = argparse.ArgumentParser(prog="coinfer plan", description=__doc__.splitlines()[0])
    ap.add_argument("--bandwidth", default="2mbit", help="uplink rate, e.g. 256kbit, 2mbit (default 2mbit)")
    ap.add_argument("--down-bandwidth", default=None, help="downlink rate (default: as uplink)")
    ap.add_argument("--rtt", default="40ms", help="round-trip time, e.g. 40ms (default 40ms)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens (default 32)")
    ap.add_argument("--model", default=DEFAULT_MODEL_DIR, help="prepared model dir")
    ap.add_argument(
        "--weights", default="fp32", choices=("fp32", "bf16", "int8", "int4"), help="device weight precision"
    )
    ap.add_argument("--max-device-layers", type=int, default=-1, help="layers the device holds (-1 = all)")
    ap.add_argument("--device-slowdown", type=float, default=1.0, help="emulate a device this many times slower")
    ap.add_argument("--edge", default="", help="host:port of a running edge to take its profile and load from")
    ap.add_argument("--edge-queue", default="0ms", help="edge wait per work item when --edge is not given")
    ap.add_argument("--profile-dir", default=DEFAULT_PROFILE_DIR, help="cost profile cache dir")
    ap.add_argument("--png", default="", help="write a plot of predicted latency per split here")
    ap.add_argument("--json", default="", help="write the plan and every candidate here")
    planner = add_group_flags(ap, PlannerSettings, env_prefix=None)
    planner.add_argument("--codecs", dest="plan_codecs", default=None, help="the same as --plan-codecs")
    add_group_flags(ap, EnergySettings, env_prefix=None)
    return ap


def _profiles(a: argparse.Namespace) -> tuple[CostProfile, part.EdgeView]:
    """The device's profile as an agent with these flags would measure it, and the edge's: a running
    edge's own (--edge) or this host's whole model."""
    from coinfer import profile

    device = profile.head_profile(a.model, a.max_device_layers, a.weights, a.device_slowdown, a.profile_dir or None)
    if a.edge:
        return device, edge_view(a.edge)
    whole = (
        device.slowed(1.0)
        if device.whole_model
        else profile.head_profile(a.model, -1, "fp32", cache_dir=a.profile_dir or None)
    )
    return device, part.EdgeView(whole, parse_duration(a.edge_queue))


def edge_view(address: str, timeout: float = 5.0) -> part.EdgeView:
    """A running edge's cost profile and load, from one Describe (plaintext, no token: a what-if on a
    test edge). Why not the device's EdgeClient: the library must not import an app."""
    import grpc

    from coinfer import profile, wire
    from coinfer.v1 import edge_pb2 as pb
    from coinfer.v1 import edge_pb2_grpc

    with grpc.insecure_channel(address, options=wire.channel_options(16 << 20)) as channel:
        try:
            reply = edge_pb2_grpc.EdgeInferenceStub(channel).Describe(
                pb.DescribeRequest(include_profile=True), timeout=timeout
            )
        except grpc.RpcError as e:
            raise ConnectionError(f"edge {address}: {e.code().name}: {e.details()}") from None
    if not reply.HasField("profile"):
        raise ValueError(f"edge {address} serves no cost profile (started with --no-profile?)")
    return part.EdgeView(profile.from_pb(reply.profile), reply.load.queue_seconds)


def _constraints(planner: PlannerSettings, model_dir: str) -> part.Constraints:
    from coinfer import codec_accuracy

    table = codec_accuracy.load(model_dir) if planner.min_agreement > 0 else None
    return part.Constraints(
        planner.min_device_layers,
        None,
        tuple(split_list(planner.plan_codecs)),
        planner.min_agreement,
        table.agreements() if table else None,
    )


def table(plan: part.Plan) -> str:
    rows = [f"{'split':>5} {'codec':>9} {'TTFT ms':>8} {'ms/token':>9} {'total s':>8} {'KB up':>8} {'energy J':>9}"]
    for k, c in plan.per_split().items():
        mark = "  <- chosen" if c is plan.best else ""
        rows.append(
            f"{k:>5} {c.codec:>9} {c.ttft * 1e3:>8.0f} {c.per_token * 1e3:>9.1f} {c.total:>8.3f} "
            f"{c.bytes_up / 1024:>8.1f} {c.energy:>9.3f}{mark}"
        )
    return "\n".join(rows)


def plot(plan: part.Plan, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best_per_split = plan.per_split()
    ks = list(best_per_split)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ks, [best_per_split[k].total for k in ks], marker=".", label="predicted total")
    ax.plot(ks, [best_per_split[k].ttft for k in ks], marker=".", label="predicted TTFT", alpha=0.6)
    ax.axvline(plan.split, color="red", linestyle="--", label=f"chosen k={plan.split}")
    ax.set_xlabel("split k (layers on the device)")
    ax.set_ylabel("seconds")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    try:
        planner, energy = group_from_args(PlannerSettings, a), group_from_args(EnergySettings, a)
    except ValidationError as e:
        print(f"coinfer plan: {validation_message(e)}", file=sys.stderr)
        return 2
    try:
        up = parse_rate(a.bandwidth) / 8
        down = parse_rate(a.down_bandwidth) / 8 if a.down_bandwidth else up
        if up <= 0 or down <= 0:
            raise ValueError("bandwidth must be > 0")
        link = part.LinkEstimate(up, down, parse_duration(a.rtt))
        device, edge = _profiles(a)
        plan = part.plan(
            device,
            edge,
            link,
            a.prompt_tokens,
            a.max_tokens,
            _constraints(planner, a.model),
            objective_of(planner, energy),
        )
    except (ValueError, OSError) as e:
        print(f"coinfer plan: {e}", file=sys.stderr)
        return 2
    print(table(plan))
    print(plan.reason)
    title = (
        f"{a.bandwidth} up, RTT {a.rtt}, {a.prompt_tokens} prompt + {a.max_tokens} new tokens, "
        f"device x{a.device_slowdown:g}, floor {planner.min_device_layers}"
    )
    if a.png:
        plot(plan, a.png, title)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"title": title, **plan.to_dict()}, f, indent=1)
    return 0
