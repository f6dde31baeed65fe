"""The template host's own view of its connections (lifecycle.Listener), which the SIGTERM drain waits on:
a connection is busy from the first byte of a request until its answer has gone out whole."""
import socket

import lifecycle
import pytest


@pytest.fixture
def listener():
    sock = lifecycle.Listener.wrap(socket.create_server(("127.0.0.1", 0)))
    yield sock
    sock.close()


def test_a_connection_is_busy_from_its_first_byte_until_its_answer_went_out(listener):
    with socket.create_connection(listener.getsockname(), timeout=5) as client:
        server_side, _ = listener.accept()
        assert isinstance(server_side, lifecycle.Connection)
        assert not listener.busy(), "an idle connection holds nothing"
        client.sendall(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345")  # an upload still arriving
        assert server_side.recv(65536)
        assert listener.busy()
        server_side.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        assert not listener.busy(), "answered: a keep-alive connection waiting for more is idle"
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert server_side.recv(65536) and listener.busy()
        server_side.close()
        assert not listener.busy(), "a closed connection holds nothing"


def test_an_answer_the_kernel_has_not_taken_whole_keeps_the_connection_busy(listener):
    with socket.create_connection(listener.getsockname(), timeout=5) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        server_side, _ = listener.accept()
        server_side.setblocking(False)
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        server_side.recv(65536)
        big = bytes(64 * 2**20)  # more than the socket buffers take while the client reads nothing
        sent = server_side.send(big)
        assert sent < len(big) and listener.busy()
        with pytest.raises(BlockingIOError):
            while True:
                server_side.send(big)
        assert listener.busy()
        server_side.close()
