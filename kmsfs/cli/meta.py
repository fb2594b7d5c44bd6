"""``kmsfs completion bash|zsh`` and ``kmsfs man``: both generated from the parser
(shtab, argparse-manpage), so every subcommand is in them as soon as it is in the parser."""

from __future__ import annotations

import argparse
import sys


def _full_parser() -> argparse.ArgumentParser:
    from kmsfs.cli import build_parser

    return build_parser()


def cmd_completion(args: argparse.Namespace) -> None:
    import shtab

    sys.stdout.write(shtab.complete(_full_parser(), shell=args.shell))


def cmd_man(args: argparse.Namespace) -> None:
    from argparse_manpage.manpage import Manpage

    parser = _full_parser()
    sys.stdout.write(str(Manpage(parser)))


def add_parsers(commands: argparse._SubParsersAction) -> None:
    completion = commands.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        description="Print a completion script. bash: kmsfs completion bash > "
        "/etc/bash_completion.d/kmsfs (or source it from ~/.bashrc); zsh: kmsfs completion "
        "zsh > a directory in $fpath, named _kmsfs.",
    )
    completion.add_argument("shell", choices=["bash", "zsh"])
    completion.set_defaults(func=cmd_completion)
    man = commands.add_parser(
        "man",
        help="print the manual page (roff)",
        description="Print kmsfs(1) in roff: kmsfs man | man -l -, or kmsfs man > "
        "/usr/local/share/man/man1/kmsfs.1",
    )
    man.set_defaults(func=cmd_man)
