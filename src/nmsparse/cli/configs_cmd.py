"""``nmsparse configs list|show|validate``."""

from __future__ import annotations

import argparse

from ..config.load import dump_config, list_recipes, load_config, recipe_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "show", "validate"])
    parser.add_argument("name", nargs="?", help="recipe name or YAML file (show/validate); validate without a "
                        "name checks every shipped recipe")
    parser.add_argument("--resolved", action="store_true", help="show: the full config with defaults filled in")


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        for name, purpose in list_recipes().items():
            print(f"{name:<28} {purpose}")
        return 0
    if args.action == "show":
        name = args.name or "default"
        print(dump_config(load_config(name)) if args.resolved else recipe_text(name), end="")
        return 0
    names = [args.name] if args.name else list(list_recipes())
    for name in names:
        load_config(name)  # raises ConfigError listing every problem
        print(f"ok  {name}")
    return 0

