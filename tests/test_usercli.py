"""`user` CLI sub-commands, run through a real argparse parser like cli.py builds."""

import argparse
import getpass
import io
import sys

import pytest

from boshroster.auth.accounts import AccountStore
from boshroster.cli.users import add_user_parser, run_user_command


@pytest.fixture
def store(tmp_path):
    s = AccountStore(str(tmp_path / "data" / "accounts.sqlite3"))
    yield s
    s.close()


def make_parser():
    parser = argparse.ArgumentParser(prog="boshroster")
    parser.add_argument("--config")
    sub = parser.add_subparsers(dest="command", required=True)
    add_user_parser(sub)
    return parser


def run(store, monkeypatch, argv, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    args = make_parser().parse_args(argv)
    assert args.command == "user"
    return run_user_command(args, store)


def test_add_list_passwd_delete(store, monkeypatch, capsys):
    assert run(store, monkeypatch, ["user", "add", "Alice", "--password-stdin"], "first-pw\nignored\n") == 0
    out, err = capsys.readouterr()
    assert out == "added alice\n" and err == ""
    assert store.check_password("alice", "first-pw")

    assert run(store, monkeypatch, ["user", "add", "bob", "--password-stdin"], "bob-pw\r\n") == 0
    assert store.check_password("bob", "bob-pw")  # CRLF stripped
    capsys.readouterr()

    assert run(store, monkeypatch, ["user", "list"]) == 0
    assert capsys.readouterr().out == "alice\nbob\n"

    assert run(store, monkeypatch, ["--config", "x.ini", "user", "passwd", "ALICE", "--password-stdin"], "second-pw\n") == 0
    out, _ = capsys.readouterr()
    assert out == "password changed for alice\n"
    assert store.check_password("alice", "second-pw")
    assert not store.check_password("alice", "first-pw")

    assert run(store, monkeypatch, ["user", "delete", "alice"]) == 0
    assert capsys.readouterr().out == "deleted alice\n"
    assert store.list() == ["bob"]
    for secret in ("first-pw", "second-pw", "bob-pw"):
        assert secret not in out


def test_errors(store, monkeypatch, capsys):
    store.add("alice", "pw")
    assert run(store, monkeypatch, ["user", "add", "alice", "--password-stdin"], "x\n") == 1
    assert "already exists" in capsys.readouterr().err
    assert store.check_password("alice", "pw")

    assert run(store, monkeypatch, ["user", "add", "a b", "--password-stdin"], "x\n") == 1
    assert "invalid username" in capsys.readouterr().err

    assert run(store, monkeypatch, ["user", "add", "carol", "--password-stdin"], "") == 1
    assert "no password" in capsys.readouterr().err
    assert not store.exists("carol")

    assert run(store, monkeypatch, ["user", "passwd", "nobody", "--password-stdin"], "x\n") == 1
    assert "no account" in capsys.readouterr().err

    assert run(store, monkeypatch, ["user", "delete", "nobody"]) == 1
    assert "no account" in capsys.readouterr().err


def test_subcommand_required(capsys):
    with pytest.raises(SystemExit) as info:
        make_parser().parse_args(["user"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        make_parser().parse_args(["user", "add"])  # NAME missing


def test_prompted_password(store, monkeypatch, capsys):
    answers = iter(["typed-pw", "typed-pw"])
    prompts = []

    def fake_getpass(prompt="Password: ", stream=None):
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(getpass, "getpass", fake_getpass)
    assert run(store, monkeypatch, ["user", "add", "dave"]) == 0
    assert len(prompts) == 2
    assert store.check_password("dave", "typed-pw")

    answers = iter(["one", "two"])
    assert run(store, monkeypatch, ["user", "passwd", "dave"]) == 1
    out, err = capsys.readouterr()
    assert "do not match" in err
    assert "one" not in out + err and "two" not in out + err
    assert store.check_password("dave", "typed-pw")


def test_import(store, monkeypatch, capsys, tmp_path):
    store.add("existing", "old")
    f = tmp_path / "users.txt"
    f.write_text(
        "# users for the pilot\n"
        "alice:alice-pw\n"
        "\n"
        "existing:new-pw\n"
        "broken line\n"
        "bob:bob:pw\n",
        encoding="utf-8",
    )
    assert run(store, monkeypatch, ["user", "import", str(f)]) == 1  # one line rejected
    out, err = capsys.readouterr()
    assert "2 added, 1 updated, 1 line(s) rejected" in out
    assert "line 5:" in err
    assert "alice-pw" not in out + err
    assert store.list() == ["alice", "bob", "existing"]
    assert store.check_password("bob", "bob:pw")
    assert store.check_password("existing", "new-pw")

    good = tmp_path / "good.txt"
    good.write_text("carol:c\n", encoding="utf-8")
    assert run(store, monkeypatch, ["user", "import", str(good)]) == 0
    assert "1 added, 0 updated" in capsys.readouterr().out

    assert run(store, monkeypatch, ["user", "import", "-"], "dave:d\nalice:a2\n") == 0
    assert "1 added, 1 updated" in capsys.readouterr().out
    assert store.check_password("alice", "a2")


def test_import_file_problems(store, monkeypatch, capsys, tmp_path):
    assert run(store, monkeypatch, ["user", "import", str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt" in capsys.readouterr().err
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("zoë:pw\n".encode("latin-1"))
    assert run(store, monkeypatch, ["user", "import", str(bad)]) == 1
    assert "UTF-8" in capsys.readouterr().err
    assert store.list() == []
