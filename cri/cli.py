"""`stockade cri`: the command line of the CRI server (`serve`)."""

from __future__ import annotations

import argparse

from stockade.runtime._lite.argparse import formatter

from . import config as configmod


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    config = configmod.load(args.config, explicit=args.config is not None)
    for flag in ("socket", "state_dir", "image_store", "log_level", "log_format"):
        if getattr(args, flag) is not None:
            setattr(config, flag, getattr(args, flag))
    config.insecure_registries += args.insecure_registry
    if args.no_bpf_agent:
        config.bpf_agent = False
    configmod.check(config, args.config or configmod.DEFAULT_FILE)
    from .server import serve

    return serve(config)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stockade cri", description="the CRI runtime.v1 server kubelet talks to",
                                formatter_class=formatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="serve CRI on a unix socket until SIGTERM",
                           formatter_class=formatter)
    serve.add_argument("--config", help=f"TOML configuration (default {configmod.DEFAULT_FILE}, if present)")
    serve.add_argument("--socket", help="unix socket to listen on (default /run/stockade/stockade.sock)")
    serve.add_argument("--state-dir", help="pods' and containers' records (default /var/lib/stockade/cri)")
    serve.add_argument("--image-store", help="image store (default /var/lib/stockade/images)")
    serve.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                       help="plain HTTP for this registry (repeatable; adds to the configuration's)")
    serve.add_argument("--no-bpf-agent", action="store_true",
                       help="no BPF agent in this process (another runs it, or no policy needs it)")
    serve.add_argument("--log-level", choices=configmod.LOG_LEVELS)
    serve.add_argument("--log-format", choices=("text", "json"))
    return p
