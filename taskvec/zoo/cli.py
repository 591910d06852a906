"""`taskvec zoo build [NAME] [--fast|--tiny] [--cache DIR] [--seed N] [--rebuild]`, `taskvec zoo list`."""
from __future__ import annotations

import argparse
import json


def main(argv: list[str]) -> int:
    from taskvec.zoo.core import ZOOS

    parser = argparse.ArgumentParser(prog="taskvec zoo", description="offline zoo of real fine-tuned models")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or verify and reuse) a zoo in the cache")
    b.add_argument("name", nargs="?", default="all",
                   help=f"zoo to build: {', '.join(ZOOS)}, a hub:* zoo, or 'all' (the offline ones)")
    speed = b.add_mutually_exclusive_group()
    speed.add_argument("--fast", action="store_true", help="CI / demo mode (minutes)")
    speed.add_argument("--tiny", action="store_true", help="test mode: one task, a few steps")
    b.add_argument("--cache", help="cache directory (default: $TASKVEC_CACHE or ~/.cache/taskvec)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--rebuild", action="store_true", help="rebuild every entry even when the cache verifies")
    b.add_argument("--head", choices=("zero-shot", "probe"), default="zero-shot",
                   help="encoder zoo's frozen task heads: EMTA's zero-shot prompt heads (default) or logistic probes")
    ls = sub.add_parser("list", help="known zoos and the builds in the cache")
    ls.add_argument("--cache")
    ls.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from taskvec.zoo.core import build, list_zoos

    if args.cmd == "list":
        rows = list_zoos(args.cache)
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            for r in rows:
                print(f"{r['zoo']:<24} {r['description']}")
                for where in r["built"]:
                    print(f"{'':<24}   built: {where}")
        return 0
    names = list(ZOOS) if args.name == "all" else [args.name]
    for name in names:
        zoo = build(name, fast="tiny" if args.tiny else args.fast, cache=args.cache, seed=args.seed, head=args.head,
                    rebuild=args.rebuild)
        print(zoo)
        if zoo.manifest.get("rebuilt"):
            print("  rebuilt: " + "; ".join(zoo.manifest["rebuilt"]))
        print(f"  manifest: {zoo.root / 'manifest.json'} ({zoo.manifest.get('last_build_seconds')} s)")
    return 0
