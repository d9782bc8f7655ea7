"""The Redis key names of the cluster, in one place (so an operator can read them).

  br:nodes                 set    node ids that joined and were not cleaned up yet
  br:node:<n>:hb           string this node's heartbeat; expires after cluster_node_timeout
  br:node:<n>:url          string where the node is reached (cluster_internal_url)
  br:node:<n>:sessions     set    "<user>/<resource>" bound on the node (cleanup index)
  br:node:<n>:inbox        stream stanzas for the node's resources (consumer group "g")
  br:node:<n>:cleanup      string lock of the node that cleans up a dead node
  br:user:<u>              hash   resource -> JSON entry (node, priority, presence, carbons)
  br:roster:<u>            string the user's roster as JSON, shared by the nodes
  br:roster-lock:<u>       string single-flight guard of the backend GET (SET NX PX)
  br:refresh:<id>          list   answers of the nodes to one refresh request
  br:cluster-secret        string shared by the nodes: authenticates their internal HTTP requests
  br:sm-owner:<id>         string node holding a XEP-0198 session handed over from its first node
  br:sm-tomb:<id>          string expired XEP-0198 id: JSON {u, h}, expires after an hour
  channel br:dir           directory changes (every node mirrors the others' entries)
  channel br:ctl           control: refresh requests, roster changes
  channel br:ping:<n>      the node's own liveness check of its subscription (node.py)
"""

import socket

NODES = "br:nodes"
DIR_CHANNEL = "br:dir"
CTL_CHANNEL = "br:ctl"
GROUP = "g"
CLUSTER_SECRET = "br:cluster-secret"


def heartbeat(node: str) -> str:
    return f"br:node:{node}:hb"


def node_url(node: str) -> str:
    return f"br:node:{node}:url"


def node_sessions(node: str) -> str:
    return f"br:node:{node}:sessions"


def inbox(node: str) -> str:
    return f"br:node:{node}:inbox"


def cleanup_lock(node: str) -> str:
    return f"br:node:{node}:cleanup"


def user(username: str) -> str:
    return f"br:user:{username}"


def roster(username: str) -> str:
    return f"br:roster:{username}"


def roster_lock(username: str) -> str:
    return f"br:roster-lock:{username}"


def refresh_reply(request_id: str) -> str:
    return f"br:refresh:{request_id}"


def default_node_id() -> str:
    """node_id when the configuration leaves it empty: the host name, as a key-safe word."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:64] or "node"


def sm_owner(sm_id: str) -> str:
    return f"br:sm-owner:{sm_id}"


def sm_tombstone(sm_id: str) -> str:
    return f"br:sm-tomb:{sm_id}"


def ping_channel(node: str) -> str:
    return f"br:ping:{node}"
