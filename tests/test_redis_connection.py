"""The one Redis connection factory (core.redis_connection): settings and URL parsing, the
clients it builds for plain, TLS and Sentinel mode, and TLS + password against a real
redis-server started with a self-signed certificate."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from redis.connection import SSLConnection
from redis.exceptions import AuthenticationError, ConnectionError, ResponseError
from redis.sentinel import (
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)

from core.redis_connection import (
    auth_kwargs,
    connect_front,
    connect_worker,
    database_of,
    sentinel_addresses,
    tls_kwargs,
)
from settings.config import Settings
from tests.support.stack import free_port, wait_for


def settings(**values) -> Settings:
    return Settings(_env_file=None, **values)


def test_sentinel_addresses_and_database():
    config = settings(redis_sentinels="10.0.0.1:26380, sentinel-b , [::1]:26381")
    assert sentinel_addresses(config) == [("10.0.0.1", 26380), ("sentinel-b", 26379), ("::1", 26381)]
    assert settings(redis_sentinels='["a:1"]').redis_sentinels == ["a:1"]
    assert database_of("redis://h:6379/3") == 3 and database_of("rediss://h") == 0


def test_credentials_from_settings_unless_the_url_has_them():
    config = settings(redis_url="redis://h:6379/0", redis_username="imagine", redis_password="s3cret")
    assert auth_kwargs(config) == {"password": "s3cret", "username": "imagine"}
    in_url = settings(redis_url="redis://u:urlpass@h:6379/0", redis_username="imagine", redis_password="s3cret")
    assert auth_kwargs(in_url) == {}
    assert "s3cret" not in repr(config)  # a secret


def test_tls_options():
    assert tls_kwargs(settings(redis_tls_ca_file="/ca.pem")) == {"ssl_cert_reqs": "required", "ssl_ca_certs": "/ca.pem"}
    assert tls_kwargs(settings(redis_tls_cert_reqs="none")) == {"ssl_cert_reqs": "none", "ssl_check_hostname": False}
    mutual = tls_kwargs(settings(redis_tls_certfile="/c.pem", redis_tls_keyfile="/k.pem"))
    assert mutual["ssl_certfile"] == "/c.pem" and mutual["ssl_keyfile"] == "/k.pem"


def test_plain_and_tls_clients_keep_the_front_ends_timeouts():
    front = connect_front(settings(redis_url="rediss://h:6380/2", redis_password="pw", redis_tls_ca_file="/ca.pem",
                                   redis_timeout_s=0.7))
    kwargs = front.connection_pool.connection_kwargs
    assert front.connection_pool.connection_class is SSLConnection
    assert kwargs["socket_timeout"] == 0.7 and kwargs["socket_connect_timeout"] == 0.7
    assert kwargs["password"] == "pw" and kwargs["ssl_ca_certs"] == "/ca.pem" and kwargs["db"] == 2
    assert front.get_retry()._retries == 1
    forced = connect_front(settings(redis_url="redis://h:6380/0", redis_tls=True, redis_tls_cert_reqs="none"))
    assert forced.connection_pool.connection_class is SSLConnection
    assert forced.connection_pool.connection_kwargs["ssl_check_hostname"] is False
    worker = connect_worker(settings(redis_url="redis://h:6379/0", redis_retry_s=30))
    assert worker.connection_pool.connection_kwargs["socket_timeout"] is None
    assert worker.get_retry()._retries >= 15


def test_sentinel_mode_builds_a_master_client():
    config = settings(redis_url="redis://:urlpw@ignored/4", redis_sentinels="127.0.0.1:1,127.0.0.1:2",
                      redis_sentinel_master="main", redis_sentinel_password="sentpw")
    client = connect_front(config)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "main" and pool.is_master
    assert pool.connection_class is SentinelManagedConnection
    assert pool.connection_kwargs["db"] == 4 and pool.connection_kwargs["password"] == "urlpw"
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [1, 2]
    assert all(s.connection_pool.connection_kwargs["password"] == "sentpw" for s in sentinels)
    tls = connect_front(settings(redis_sentinels="127.0.0.1:1", redis_tls=True, redis_tls_ca_file="/ca.pem"))
    assert tls.connection_pool.connection_class is SentinelManagedSSLConnection
    assert tls.connection_pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"
    with pytest.raises(ConnectionError):  # no sentinel answers: a RedisError, "queue unavailable"
        client.ping()


@pytest.fixture(scope="module")
def tls_redis():
    """redis-server on a TLS port only, with a password and a self-signed certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    work = Path(tempfile.mkdtemp(prefix="imagine-tls-"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", work / "key.pem",
                    "-out", work / "cert.pem", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", "0", "--tls-port", str(port),
         "--bind", "127.0.0.1", "--tls-cert-file", work / "cert.pem", "--tls-key-file", work / "key.pem",
         "--tls-ca-cert-file", work / "cert.pem", "--tls-auth-clients", "no", "--requirepass", "tls-secret",
         "--save", "", "--dir", work], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: server.poll() is not None or _answers(port, work), 10, what="TLS redis-server")
        if server.poll() is not None:
            pytest.skip("this redis-server has no TLS support")
        yield port, work
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def _answers(port: int, work: Path) -> bool:
    try:
        return connect_front(settings(redis_url=f"rediss://127.0.0.1:{port}/0", redis_password="tls-secret",
                                      redis_tls_ca_file=str(work / "cert.pem"))).ping()
    except Exception:
        return False


def test_tls_with_a_password_against_a_real_server(tls_redis):
    port, work = tls_redis
    url = f"rediss://127.0.0.1:{port}/0"
    good = connect_front(settings(redis_url=url, redis_password="tls-secret", redis_tls_ca_file=str(work / "cert.pem")))
    assert good.set("imagine:tls-check", "1") and good.get("imagine:tls-check") == b"1"
    worker = connect_worker(settings(redis_url=url, redis_password="tls-secret",
                                     redis_tls_ca_file=str(work / "cert.pem"), redis_retry_s=1))
    assert worker.ping()
    with pytest.raises(ConnectionError):  # the certificate is checked: unknown CA refused
        connect_front(settings(redis_url=url, redis_password="tls-secret")).ping()
    with pytest.raises((AuthenticationError, ResponseError)):
        connect_front(settings(redis_url=url, redis_tls_ca_file=str(work / "cert.pem"))).ping()
    with pytest.raises(ConnectionError):  # plain text to a TLS port
        connect_front(settings(redis_url=f"redis://127.0.0.1:{port}/0", redis_password="tls-secret")).ping()
