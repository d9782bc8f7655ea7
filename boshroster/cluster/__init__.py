"""More than one process (issue 14): a cluster of nodes sharing Redis (and PostgreSQL).

Only imported when ``cluster_redis_url`` (or ``database_url``) is set: the
single-process server never loads redis-py or psycopg.  The wiring builds a
``ClusterNode`` (node.py), which hooks the event bus like any feature:

  directory.py   who is bound where: a hash per user and an index per node in
                 Redis, mirrored in memory on every node (``RemoteSession``)
  routing.py     a Redis Stream per node as its inbox, written in batches per node
  view.py        ``ClusterSessions``: local + remote resources, what im/ consults
  node.py        heartbeats, a dead node's cleanup, start and stop
  rosters.py     one backend GET per user for the whole cluster; refresh everywhere
  bosh_forward.py  a BOSH request for another node's sid is relayed to it
  pg*.py         PostgreSQL storage (accounts, offline messages), when database_url is set
"""
