"""The ``boshroster`` command: ``serve`` and ``user …``, each taking ``--config FILE``.

gevent must patch the standard library before anything else imports it
(Bottle, requests, sqlite callers), so this module patches first thing.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from boshroster import __version__  # noqa: E402
from boshroster.config import ConfigError, StartupError, load  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS, help="TOML config file (see conf/boshroster.toml)")
    parser = argparse.ArgumentParser(prog="boshroster", parents=[common], description="XMPP server for browser clients")
    parser.add_argument("--version", action="version", version=f"boshroster {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", parents=[common], help="run the server in the foreground")
    from boshroster.cli.users import add_user_parser

    before = set(sub.choices)
    add_user_parser(sub)
    for name in set(sub.choices) - before:  # let `user … --config F` work too
        _add_config_everywhere(sub.choices[name], common)
    return parser


def _add_config_everywhere(parser: argparse.ArgumentParser, common) -> None:
    try:
        parser.add_argument("--config", "-c", default=argparse.SUPPRESS, help="TOML config file")
    except argparse.ArgumentError:
        pass
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _add_config_everywhere(subparser, common)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"boshroster: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        from boshroster.server import Server, setup_logging

        setup_logging(config.log_level)
        try:
            server = Server(config)
            server.serve_forever()  # binds the listeners first: "address in use" lands here
        except (OSError, StartupError) as exc:
            print(f"boshroster: cannot start: {exc}", file=sys.stderr)
            return 1
        return 0
    from boshroster.auth.factory import account_store
    from boshroster.cli.users import run_user_command

    os.makedirs(config.data_dir, exist_ok=True)
    try:
        store = account_store(config)  # database_url set: PostgreSQL
    except StartupError as exc:
        print(f"boshroster: {exc}", file=sys.stderr)
        return 1
    with store:
        return run_user_command(args, store)


if __name__ == "__main__":
    sys.exit(main())
