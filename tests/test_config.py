"""boshroster.config: the sample documents every key, env overrides, clear errors."""

import dataclasses
import os
import subprocess
import sys
import tomllib

import pytest

from boshroster.config import Config, ConfigError, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "conf", "boshroster.toml")
FIELDS = [f.name for f in dataclasses.fields(Config)]


def write(tmp_path, text: str, name: str = "c.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_sample_documents_every_key():
    with open(SAMPLE, "rb") as fh:
        sample = tomllib.load(fh)
    missing = [name for name in FIELDS if name not in sample]
    assert not missing, f"keys missing from conf/boshroster.toml: {missing}"
    extra = sorted(set(sample) - set(FIELDS))
    assert not extra, f"conf/boshroster.toml has keys Config does not know: {extra}"


def test_sample_values_have_the_field_types():
    with open(SAMPLE, "rb") as fh:
        sample = tomllib.load(fh)
    defaults = Config()
    for name in FIELDS:
        default = getattr(defaults, name)
        value = sample[name]
        if isinstance(default, float):
            assert isinstance(value, (int, float)) and not isinstance(value, bool), name
        else:
            assert type(value) is type(default), (name, value)


def test_sample_loads(tmp_path):
    config = load(SAMPLE, env={})
    assert config.domain == "localhost"
    assert config.http_ports == [5280]
    # relative data_dir is resolved against the file's folder
    assert os.path.isabs(config.data_dir)
    assert os.path.normpath(config.data_dir) == os.path.join(ROOT, "data")
    assert config.http_roster_url == "http://127.0.0.1:8008/contacts/%s"


def test_sample_shows_defaults_unless_noted():
    """Every sample value equals the default, except the lines that say '# default …'."""
    with open(SAMPLE, "rb") as fh:
        sample = tomllib.load(fh)
    with open(SAMPLE) as fh:
        noted = {line.split("=", 1)[0].strip() for line in fh
                 if "#" in line and "default" in line.split("#", 1)[1] and "=" in line.split("#", 1)[0]}
    defaults = Config()
    differing = [name for name in FIELDS if sample[name] != getattr(defaults, name) and name not in noted]
    assert not differing, f"sample values differ from the defaults without saying so: {differing}"


def test_defaults_without_a_file():
    config = load(None, env={})
    assert config == Config()


def test_env_override_list_and_scalars(tmp_path):
    env = {
        "BOSHROSTER_HTTP_PORTS": "[5299]",
        "BOSHROSTER_DOMAIN": "chat.example",
        "BOSHROSTER_BOSH_MAX_WAIT": "30",
        "BOSHROSTER_WEBSOCKET_PING_INTERVAL": "0.5",
        "BOSHROSTER_CONSIDER_BOSH_SECURE": "true",
        "BOSHROSTER_HTTP_INTERFACES": '["0.0.0.0", "::"]',
        "UNRELATED": "x",
    }
    config = load(SAMPLE, env=env)
    assert config.http_ports == [5299]
    assert config.domain == "chat.example"
    assert config.bosh_max_wait == 30
    assert config.websocket_ping_interval == 0.5
    assert config.consider_bosh_secure is True
    assert config.http_interfaces == ["0.0.0.0", "::"]


def test_env_overrides_the_file_and_keyword_overrides_env(tmp_path):
    path = write(tmp_path, 'domain = "file.example"\nhttp_ports = [1]\n')
    config = load(path, env={"BOSHROSTER_DOMAIN": "env.example"})
    assert config.domain == "env.example" and config.http_ports == [1]
    config = load(path, env={"BOSHROSTER_DOMAIN": "env.example"}, domain="kw.example")
    assert config.domain == "kw.example"


def test_env_is_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("BOSHROSTER_HTTP_PORTS", "[5301]")
    assert load(None).http_ports == [5301]


def test_bad_env_value_names_the_key():
    with pytest.raises(ConfigError) as info:
        load(None, env={"BOSHROSTER_BOSH_MAX_WAIT": "soon"})
    assert "bosh_max_wait" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load(None, env={"BOSHROSTER_HTTP_PORTS": "[5299"})
    assert "http_ports" in str(info.value)


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, 'domain = "x"\nbosh_max_wiat = 10\n')
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert "bosh_max_wiat" in str(info.value)


@pytest.mark.parametrize(
    "line, key",
    [
        ('http_ports = "http"', "http_ports"),
        ('http_ports = ["5280"]', "http_ports"),
        ("http_ports = [5280, true]", "http_ports"),
        ("http_interfaces = [127]", "http_interfaces"),
        ("domain = 5", "domain"),
        ("domain = [\"a\"]", "domain"),
        ('bosh_max_wait = "sixty"', "bosh_max_wait"),
        ("bosh_max_wait = 1.5", "bosh_max_wait"),
        ("bosh_max_wait = true", "bosh_max_wait"),
        ("consider_bosh_secure = 1", "consider_bosh_secure"),
        ('websocket_ping_interval = "fast"', "websocket_ping_interval"),
        ("trusted_proxies = {a = 1}", "trusted_proxies"),
    ],
)
def test_wrong_type_names_the_key(tmp_path, line, key):
    path = write(tmp_path, line + "\n")
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert key in str(info.value)


def test_int_is_accepted_for_a_float_field(tmp_path):
    config = load(write(tmp_path, "websocket_ping_interval = 2\n"), env={})
    assert config.websocket_ping_interval == 2.0 and isinstance(config.websocket_ping_interval, float)


@pytest.mark.parametrize(
    "text, word",
    [
        ('auth = "ldap"\n', "auth"),
        ('auth = "http"\n', "http_auth_url"),
        ('resource_conflict = "newest"\n', "resource_conflict"),
        ('stanza_max_depth = 0\n', "stanza_max_depth"),
    ],
)
def test_bad_choices_name_the_key(tmp_path, text, word):
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text), env={})
    assert word in str(info.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path / "nope.toml"), env={})
    assert "nope.toml" in str(info.value)
    bad = write(tmp_path, "domain = \n")
    with pytest.raises(ConfigError) as info:
        load(bad, env={})
    assert bad in str(info.value)


def test_bosh_requests_is_at_least_hold_plus_one():
    assert Config(bosh_max_requests=2, bosh_hold=1).bosh_requests == 2
    assert Config(bosh_max_requests=1, bosh_hold=2).bosh_requests == 3


def run_cli(*args, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOSHROSTER_")}
    return subprocess.run(
        [sys.executable, "-m", "boshroster", *args], capture_output=True, text=True, timeout=60, cwd=cwd, env=env
    )


def test_serve_with_missing_config_exits_2_with_a_clear_message(tmp_path):
    result = run_cli("serve", "--config", "missing.toml", cwd=str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert "missing.toml" in result.stderr
    assert "not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_a_bad_key_exits_2_naming_it(tmp_path):
    path = write(tmp_path, "no_such_setting = 1\n")
    result = run_cli("serve", "--config", path, cwd=str(tmp_path))
    assert result.returncode == 2
    assert "no_such_setting" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_on_a_busy_port_exits_1_with_a_clear_message(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write(tmp_path, f'http_ports = [{port}]\ndata_dir = "data"\n')
        result = run_cli("serve", "--config", path, cwd=str(tmp_path))
    assert result.returncode == 1, result.stderr
    assert "cannot start" in result.stderr
    assert "Traceback" not in result.stderr
