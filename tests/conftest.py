# Monkey-patch before anything else imports socket/ssl/threading: the tests run
# real gevent servers and blocking clients (http.client, websocket-client) in
# one process, so every blocking call must yield to the hub.
from gevent import monkey

monkey.patch_all()
