"""``boshroster user ...``: manage accounts in the embedded store.

    boshroster user add NAME [--password-stdin]
    boshroster user passwd NAME [--password-stdin]
    boshroster user delete NAME
    boshroster user list
    boshroster user import FILE        # 'name:password' lines; '-' reads stdin

Passwords are asked twice with getpass, or read from the first line of
standard input with ``--password-stdin`` (for scripts).  They are never
printed.  Exit code 0 on success, 1 on any error (for ``import``: when at
least one line was rejected, the good lines are still applied).
"""

from __future__ import annotations

import argparse
import getpass
import sys

from boshroster.auth.accounts import AccountError, AccountExists, AccountStore, NoSuchAccount
from boshroster.xmpp.jid import JIDError, prep_localpart


def add_user_parser(subparsers) -> None:
    """Add the ``user`` command (with its sub-commands) to ``subparsers``."""
    user = subparsers.add_parser(
        "user",
        help="manage accounts in the embedded account store",
        description="Manage accounts in the embedded account store (SCRAM keys only).",
    )
    sub = user.add_subparsers(dest="user_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("add", help="create an account")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")

    p = sub.add_parser("passwd", help="change an account's password")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")

    p = sub.add_parser("delete", help="delete an account")
    p.add_argument("name", metavar="NAME")

    sub.add_parser("list", help="list account names")

    p = sub.add_parser(
        "import",
        help="create or update accounts from 'name:password' lines",
        description="Create or update accounts from a UTF-8 file of 'name:password' lines "
        "('#' comments and blank lines ignored; existing accounts get the new password). "
        "FILE '-' reads standard input.",
    )
    p.add_argument("file", metavar="FILE")


class _Abort(Exception):
    pass


def _read_password(args) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
        if not password:
            raise _Abort("no password on standard input")
        return password
    try:
        first = getpass.getpass("Password: ")
        second = getpass.getpass("Password (again): ")
    except (EOFError, KeyboardInterrupt):
        raise _Abort("no password given") from None
    if first != second:
        raise _Abort("the passwords do not match")
    if not first:
        raise _Abort("the password must not be empty")
    return first


def _prepared(name: str) -> str:
    try:
        return prep_localpart(name)
    except JIDError as exc:
        raise AccountError(f"invalid username {name!r}: {exc}") from None


def run_user_command(args: argparse.Namespace, store: AccountStore) -> int:
    """Run the ``user`` sub-command in ``args`` against ``store``; return the exit code."""
    cmd = getattr(args, "user_command", None)
    try:
        if cmd == "add":
            user = _prepared(args.name)
            if store.exists(user):  # fail before prompting
                raise AccountExists(f"account {user!r} already exists")
            password = _read_password(args)
            user = store.add(user, password)
            print(f"added {user}")
        elif cmd == "passwd":
            user = _prepared(args.name)
            if not store.exists(user):  # fail before prompting
                raise NoSuchAccount(f"no account {user!r}")
            password = _read_password(args)
            store.set_password(user, password)
            print(f"password changed for {user}")
        elif cmd == "delete":
            user = _prepared(args.name)
            store.delete(user)
            print(f"deleted {user}")
        elif cmd == "list":
            for name in store.list():
                print(name)
        elif cmd == "import":
            return _import(args.file, store)
        else:
            print("boshroster user: missing sub-command (add, passwd, delete, list, import)", file=sys.stderr)
            return 2
    except (_Abort, AccountError) as exc:
        print(f"boshroster user {cmd}: {exc}", file=sys.stderr)
        return 1
    return 0


def _import(path: str, store: AccountStore) -> int:
    try:
        if path == "-":
            added, updated, errors = store.import_lines(sys.stdin)
        else:
            with open(path, encoding="utf-8", errors="strict", newline="") as fh:
                added, updated, errors = store.import_lines(fh)
    except UnicodeDecodeError:
        print(f"boshroster user import: {path}: not valid UTF-8; nothing imported", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"boshroster user import: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for message in errors:
        print(f"boshroster user import: {message}", file=sys.stderr)
    summary = f"imported: {added} added, {updated} updated"
    if errors:
        summary += f", {len(errors)} line(s) rejected"
    print(summary)
    return 1 if errors else 0
