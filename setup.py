from setuptools import find_packages, setup

setup(
    name="boshroster",
    version="0.1.0",
    description="XMPP server for browser clients (BOSH + WebSocket) whose rosters belong to a web application",
    packages=find_packages(exclude=["tests", "tests.*"]),
    python_requires=">=3.11",
    install_requires=[
        "gevent>=24.2",
        "gevent-websocket==0.10.1",
        "bottle>=0.13",
        "defusedxml>=0.7.1",
        "requests>=2.31",
        "scramp>=1.4.5",
        "precis-i18n>=1.1",
        "prometheus-client>=0.19",
        # Token login (auth/tokens.py): PyJWT verifies, cryptography for RSA/EC/EdDSA keys.
        "PyJWT>=2.10",
        "cryptography>=42",  # also AES behind the MAM archive ids (im/archive_sqlite_read.py)
    ],
    extras_require={
        # A cluster (issue 14): Redis (cluster_redis_url) and PostgreSQL (database_url); imported only then.
        "cluster": ["redis>=5", "psycopg[binary]>=3.2"],
        "test": ["pytest>=8", "pytest-timeout>=2.2", "pytest-split>=0.9", "websocket-client>=1.7", "redis>=5", "psycopg[binary]>=3.2",
                 "hypothesis>=6.100"],
    },
    entry_points={"console_scripts": ["boshroster=boshroster.cli.main:main"]},
)
