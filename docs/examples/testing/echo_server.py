"""A TCP server worker: it upper-cases what each client sends."""

import selectors
import socket


def serve(control: socket.socket, listener_fd: int) -> None:
    """Serve clients on the listening socket ``listener_fd`` until ``control`` closes."""
    listener = socket.socket(fileno=listener_fd)
    with listener, selectors.DefaultSelector() as selector:
        selector.register(control, selectors.EVENT_READ)
        selector.register(listener, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is control:
                    return  # end of file: the spawn block has ended
                connection, _ = listener.accept()
                with connection:
                    while data := connection.recv(65536):
                        connection.sendall(data.upper())
