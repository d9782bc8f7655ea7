"""The cluster settings (issue 14): every bad value stops startup naming its key."""

import pytest

from boshroster.config import ConfigError, load


@pytest.mark.parametrize("settings, key", [
    ({"cluster_redis_url": "http://127.0.0.1:6379"}, "cluster_redis_url"),
    ({"database_url": "mysql://u@h/db"}, "database_url"),
    ({"node_id": "n1.evil"}, "node_id"),  # a dot would break the BOSH sid prefix
    ({"node_id": "x" * 65}, "node_id"),
    ({"cluster_internal_url": "127.0.0.1:5280"}, "cluster_internal_url"),
    ({"cluster_heartbeat_interval": 2.0, "cluster_node_timeout": 4.0}, "cluster_node_timeout"),
    ({"cluster_heartbeat_interval": 0.0}, "cluster_node_timeout"),
    ({"database_pool_size": 0}, "database_pool_size"),
    ({"cluster_redis_timeout": 0.1}, "cluster_redis_timeout"),  # below a round trip on a loaded machine
    ({"cluster_sm_handover_test_stall": -1.0}, "cluster_sm_handover_test_stall"),  # test-only setting
    ({"cluster_sm_handover_test_stall": 61.0}, "cluster_sm_handover_test_stall"),
    ({"cluster_sm_handover_test_stall_at": "later"}, "cluster_sm_handover_test_stall_at"),
])
def test_bad_cluster_settings_name_the_key(settings, key):
    with pytest.raises(ConfigError, match=key):
        load(None, env={}, **settings)


def test_defaults_are_a_single_process():
    config = load(None, env={})
    assert config.cluster_redis_url == "" and config.database_url == ""
    good = load(None, env={"BOSHROSTER_CLUSTER_REDIS_URL": "redis://127.0.0.1:6379/0", "BOSHROSTER_NODE_ID": "n-1_a"},
                database_url="postgresql://u:p@h:5432/db")
    assert good.node_id == "n-1_a" and good.cluster_redis_url.startswith("redis://")
