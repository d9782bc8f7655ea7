"""Build the authentication side of the server from the config: one place, so wiring.py stays small.

    auth = build_auth(config)
    auth.authenticator   what sasl.py checks credentials with; every kind offers
                         check_password(user, password) and user_exists(user), the
                         account store also scram_auth_info(...)
    auth.accounts        the AccountStore, or None with auth = "http"
    auth.tokens          the TokenState (revoke_tokens, ...), or None without jwt_key
    auth.throttle        the AuthThrottle shared by every stream

Which authenticator:

==================  =====================  =========================================
auth                jwt_key                authenticator
==================  =====================  =========================================
internal            ""                     AccountStore (SCRAM + PLAIN)
http                ""                     HttpAuthenticator (PLAIN)
internal / http     set                    TokenAuthenticator wrapping the above, or
                                           alone with ``password_logins = false``
==================  =====================  =========================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from boshroster.auth.accounts import AccountStore
from boshroster.auth.http_check import HttpAuthenticator, HttpUserCheck
from boshroster.auth.throttle import AuthThrottle
from boshroster.auth.token_state import TokenState
from boshroster.auth.tokens import TokenAuthenticator, TokenVerifier


@dataclass
class AuthSetup:
    authenticator: object
    accounts: AccountStore | None
    tokens: TokenState | None
    throttle: AuthThrottle

    def user_exists(self, username: str) -> bool:
        return self.authenticator.user_exists(username)

    def close(self) -> None:
        if self.accounts is not None:
            self.accounts.close()
        if self.tokens is not None:
            self.tokens.close()


def account_store(config, database=None) -> AccountStore:
    """The account store: SQLite under data_dir, or PostgreSQL when database_url is set
    (cluster/pg_accounts.py; the ``boshroster user`` commands write there too)."""
    if config.database_url:
        from boshroster.cluster.pg_accounts import PgAccountStore

        return PgAccountStore(config.database_url, config.scram_iterations, config.database_pool_size, database)
    return AccountStore(os.path.join(config.data_dir, "accounts.sqlite3"), config.scram_iterations)


def build_auth(config, database=None) -> AuthSetup:
    user_check = None
    if config.http_user_exists_url:
        user_check = HttpUserCheck(config.http_user_exists_url, config.http_auth_timeout,
                                   config.http_user_exists_cache_seconds)
    accounts = None
    if config.auth == "http":
        passwords = HttpAuthenticator(config.http_auth_url, config.domain, config.http_auth_timeout,
                                      config.http_auth_cache_seconds, user_check=user_check)
    else:
        accounts = account_store(config, database)
        passwords = accounts
    tokens = None
    authenticator = passwords
    if config.jwt_key:
        tokens = TokenState(os.path.join(config.data_dir, "tokens.sqlite3"))
        verifier = TokenVerifier.from_config(config, tokens)
        authenticator = TokenAuthenticator(verifier, passwords if config.password_logins else None, user_check, accounts)
    return AuthSetup(authenticator, accounts, tokens, AuthThrottle.from_config(config))
