"""`coinfer` command line: prepare (and calibrate) a model dir, and run a split model locally."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from coinfer import __version__
from coinfer.model.prepare import DEFAULT_MODEL_DIR


def _cmd_prepare(args: argparse.Namespace) -> int:
    from coinfer.model.prepare import PrepareError, prepare
    from coinfer.model.weights import read_fingerprint

    try:
        out = prepare(args.source, args.out, force=args.force, progress=not args.quiet)
    except PrepareError as e:
        print(f"coinfer prepare: {e}", file=sys.stderr)
        return 2
    print(f"prepared {out} (fingerprint {read_fingerprint(out)})")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from coinfer.codec_accuracy import FILE, calibrate

    try:
        table, seconds = calibrate(args.model)
    except (FileNotFoundError, ValueError) as e:
        print(f"coinfer calibrate: {e}", file=sys.stderr)
        return 2
    worst = {c: min(e.agreement for e in row.values()) for c, row in table.table.items()}
    print(
        f"calibrated {len(table.table)} codecs x {len(next(iter(table.table.values())))} cuts on "
        f"{table.positions} positions in {seconds:.0f} s -> {args.model}/{FILE}; lowest agreement per codec: "
        + ", ".join(f"{c} {a:.1%}" for c, a in worst.items())
    )
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from coinfer.codec import CodecError
    from coinfer.model import ModelConfig
    from coinfer.model.generation import generate
    from coinfer.model.sampling import SamplingParams
    from coinfer.model.tokenizer import IncrementalDecoder, Tokenizer
    from coinfer.pipeline import LocalSplit

    try:
        tok = Tokenizer(args.model)
        cut = args.split if args.split is not None else ModelConfig.from_dir(args.model).num_layers // 2
        split = LocalSplit(args.model, split=cut, codec_name=args.codec)
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except (FileNotFoundError, ValueError, CodecError) as e:
        print(f"coinfer generate: {e}", file=sys.stderr)
        return 2
    ids = tok.encode(args.prompt) if args.raw else tok.encode_chat([{"role": "user", "content": args.prompt}])
    detok, t0, n, first = IncrementalDecoder(tok), time.perf_counter(), 0, None
    for token, _ in generate(split.step_fn(), ids, args.max_tokens, sampling, tok.eos_token_ids):
        first = first or time.perf_counter()
        n += 1
        sys.stdout.write(detok.push(token))
        sys.stdout.flush()
    elapsed = time.perf_counter() - t0
    ttft = first - t0 if first is not None else 0.0  # None when no token came
    decode_rate = (n - 1) / (time.perf_counter() - first) if first is not None and n > 1 else 0.0
    print(
        f"\n[split {split.split}/{split.cfg.num_layers}, codec {split.codec}: {len(ids)} prompt + {n} new tokens "
        f"in {elapsed:.2f}s, first token {ttft:.3f}s, {decode_rate:.1f} tok/s, "
        f"{split.stats.bytes_per_token:.0f} B/token across the cut]",
        file=sys.stderr,
    )
    return 0


def _pass_through(values: list[str]) -> list[str]:
    """`--edge-arg` / `--agent-arg` values as argv items, each split as a shell would split it, so both
    `--agent-arg=--weights=int4` and `--agent-arg='--weights int4 --compile'` work."""
    return [item for value in values for item in shlex.split(value)]


def _cmd_up(args: argparse.Namespace) -> int:
    from coinfer.tools.launcher import up

    # the pass-through flags come last: the apps' parsers let a later flag win over --split / --codec
    agent_args = ["--split", args.split, "--codec", args.codec, *_pass_through(args.agent_arg)]
    edge_args = _pass_through(args.edge_arg)
    return up(args.model, args.port, args.grpc_port, args.ops_port, agent_args, edge_args)


def _add_up(sub) -> None:
    """`coinfer up`: its own ports, split and codec, and any other setting of either app passed through."""
    u = sub.add_parser(
        "up",
        help="run an edge server and a device agent on this machine until Ctrl-C (make run)",
        description="Run an edge server and a device agent on this machine until Ctrl-C. Any other setting "
        "of either app passes through: --edge-arg=FLAGS goes to edge-server, --agent-arg=FLAGS to "
        "device-agent, each repeatable and split like a shell line (write the = sign), e.g. "
        "coinfer up --edge-arg=--max-sessions=4 --agent-arg='--weights int4 --compile'. "
        "See edge-server --help and device-agent --help.",
    )
    u.add_argument("--model", default=DEFAULT_MODEL_DIR, help=f"prepared model dir (default: {DEFAULT_MODEL_DIR})")
    u.add_argument("--port", type=int, default=8000, help="device agent REST port (default: 8000)")
    u.add_argument("--grpc-port", type=int, default=50051, help="edge gRPC port (default: 50051)")
    u.add_argument("--ops-port", type=int, default=8081, help="edge ops HTTP port (default: 8081)")
    u.add_argument("--split", default="auto", help="default split of the device agent: 0..N or auto (default: auto)")
    u.add_argument("--codec", default="f16", help="default codec: f32, f16, int8, int4 (default: f16)")
    for name, app in (("edge", "edge-server"), ("agent", "device-agent")):
        u.add_argument(
            f"--{name}-arg",
            action="append",
            default=[],
            metavar="FLAGS",
            help=f"flags for {app}, after the ones coinfer up sets (so they win); repeatable",
        )
    u.set_defaults(func=_cmd_up)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coinfer", description="Device-edge cooperative inference of split LMs.")
    p.add_argument("--version", action="version", version=f"coinfer {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prepare", help="turn a GGUF file or an HF model dir into a local model dir")
    pr.add_argument(
        "source", nargs="?", help="a .gguf file or an HF-format dir (default: the bundled SmolLM2-135M-Instruct)"
    )
    pr.add_argument("--out", default=DEFAULT_MODEL_DIR, help=f"model dir to write (default: {DEFAULT_MODEL_DIR})")
    pr.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(func=_cmd_prepare)

    c = sub.add_parser(
        "calibrate",
        help="measure every lossy codec at every cut (bytes, greedy agreement, KL) on "
        "a built-in text; the planner's accuracy budget reads the table (~2 min)",
    )
    c.add_argument("--model", default=DEFAULT_MODEL_DIR, help=f"prepared model dir (default: {DEFAULT_MODEL_DIR})")
    c.set_defaults(func=_cmd_calibrate)

    g = sub.add_parser("generate", help="generate locally through head -> codec -> tail (no network)")
    g.add_argument("prompt", help="the user message (or raw text with --raw)")
    g.add_argument("--model", default=DEFAULT_MODEL_DIR, help=f"prepared model dir (default: {DEFAULT_MODEL_DIR})")
    g.add_argument("--split", type=int, default=None, help="layers run by the head, 0..N (default: N/2)")
    g.add_argument("--codec", default="f32", help="codec across the cut: f32, f16, int8, int4 (default: f32)")
    g.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (default: 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--raw", action="store_true", help="use the prompt as raw text, without the chat template")
    g.set_defaults(func=_cmd_generate)

    _add_up(sub)

    for name, helptext in (
        ("plan", "what split the partitioner would choose on a given link (table + PNG); coinfer plan --help"),
        ("shape", "a rate- and delay-limited TCP proxy on 127.0.0.1 for trying thin links; coinfer shape --help"),
    ):
        sp = sub.add_parser(name, help=helptext, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(func=_cmd_plan if name == "plan" else _cmd_shape)
    return p


def _cmd_plan(args: argparse.Namespace) -> int:
    from coinfer.tools.whatif import main as plan_main

    return plan_main(args.rest)


def _cmd_shape(args: argparse.Namespace) -> int:
    from coinfer.tools.shaper import main as shape_main

    return shape_main(args.rest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("plan", "shape"):  # they own their flags (argparse REMAINDER drops leading --x)
        return (_cmd_plan if argv[0] == "plan" else _cmd_shape)(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
